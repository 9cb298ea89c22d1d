"""`bilevel embed` (one graph embedding) and `bilevel reproduce graph-embedding` (the talk's table).

Constant-curvature models are fitted from classical MDS with Riemannian Adam; Deep starts from the
Euclidean fit (the learned metric starts at A = I, so Deep starts exactly where Euclidean ends) and
trains nodes and metric jointly through the log map on random batches of pairs.
"""
import json
import math
import statistics
import sys
import time

import numpy as np
import torch

from .distortion import distortion, mean_average_precision
from .embeddings import (WC_RATIO_WEIGHT, WC_SHARP_TAU, WC_TAU, ChartEmbedding, ConstantCurvature,
                         DeepEmbedding, all_distances, chart_params, chart_points, fit, get_loss, parse_manifold,
                         pull_from_cut_locus, sphere_angles, to_conformal_chart)
from .graphs import BUILTINS, REAL, all_pairs, load_graph, sample_pairs, shortest_paths
from .registry import register
from .report import emit, results_dir, save_json
from .wc_polish import polish_wc

ALL_PAIRS_MAX = 200_000  # above this many pairs, train on a sampled pool of pairs
DEEP_BATCH = 1000  # Deep: log maps a step (all pairs of graphs with at most this many)
LETTER = {"euclidean": "E", "poincare": "P", "lorentz": "L", "sphere": "S"}

# DESIGN.md section 8: the talk's D_wc, dims 2 / 5 / 10: (best constant curvature, its manifold), Deep
PUBLISHED = {
    "sphere100": ([2.49, 2.11, 1.75], "SSS", [102.74, 2.41, 2.51]),
    "tree6": ([1.63, 1.29, 1.29], "LLL", [2.01, 1.13, 1.13]),
    "tree40": ([8.57, 2.95, 1.88], "PLL", [71.57, 4.47, 2.51]),
    "cycle10": ([1.31, 1.24, 1.21], "SSS", [8.23, 1.77, 1.34]),
    "cube1": ([1.78, 1.58, 1.62], "SLL", [5.99, 1.55, 1.53]),
    "cube2": ([2.48, 2.05, 1.98], "SEE", [3.69, 1.65, 1.58]),
}
DIMS = (2, 5, 10)


def _pairs(graph, seed, eval_max):
    """(train pairs, d_G, eval pairs, d_G): all pairs for small graphs, sampled pools for big ones."""
    n_all = graph.n * (graph.n - 1) // 2
    if n_all <= ALL_PAIRS_MAX:
        p, d = all_pairs(graph)
        return p, d, p, d
    rng = np.random.default_rng(seed)
    p, d = sample_pairs(graph, ALL_PAIRS_MAX, rng)
    if eval_max is None:
        pe, de = all_pairs(graph)
    else:
        pe, de = sample_pairs(graph, eval_max, rng)
    return p, d, pe, de


# Deep's initialisations: the constant-curvature fits it may start from (the one with the lowest D_wc)
INITS = {"identity": [], "euclidean": ["euclidean"], "poincare": ["poincare", "lorentz"],
         "sphere": ["sphere"], "best": ["euclidean", "poincare", "lorentz", "sphere"]}


# Deep's Adam learning rates (nodes, metric). On a curved base a node step is a step in unit-curvature
# distance and the geodesics are long (up to ~13 units on the trees): 0.01 / 0.003 there changed the
# metric by ~10% a step, lost log-map warm starts and raised the loss; 1e-3 / 1e-4 lowers it steadily.
DEEP_LR = {"euclidean": (0.01, 0.003), "poincare": (1e-3, 1e-4), "sphere": (1e-3, 1e-4)}
# Fine-tuning a converged fit on the flat base (init other than identity). sphere100 dim 2, 100 steps, seed 0
# (docs/graph_embedding.md): 0.01 / 0.003 lowered the loss most but took D_wc 30.8 -> 57.5; 1e-3 / 3e-4 -> 33.0.
DEEP_FINETUNE_LR = (1e-3, 3e-4)


# loss "wc": the constant-curvature fit on the ratio loss is fine-tuned on the wc loss for WC_STEPS steps
# from learning rate WC_LR (cosine schedule)
WC_STEPS = 2000
WC_LR = 0.01
# ... then for WC_SHARP_STEPS more from WC_SHARP_LR on the sharp wc loss (embeddings.sharp_wc_loss), which Deep
# trains on too: LAST_STAGE maps each --loss to the loss of its last stage
WC_SHARP_STEPS = 2000
WC_SHARP_LR = 1e-3
LAST_STAGE = {"ratio": "ratio", "wc": "wc_sharp"}
# ... and last, a single-factor fit moves to its conformal chart (embeddings.ChartEmbedding) for POLISH_STEPS
# proximal bundle steps on the exact D_wc (problems.wc_polish). Seed 0, dim 5, from the sharp fit: sphere100 S
# 1.4410 -> 1.4351 in 300 steps; tree40 L 1.2021 -> 1.1749 in 300, 1.1584 in 600, 1.1400 in 1500 (still falling).
POLISH_STEPS = 1000
# loss "wc" with sampled batches: this fraction of each batch is the most stretched / contracted pairs of the
# last full-pair evaluation (a random batch mostly misses the few pairs that set D_wc)
WC_HARD = 0.2


def _hard(loss, batch):
    return int(WC_HARD * batch) if loss != "ratio" and batch else 0


def _fit_constant(graph, manifold, dim, pairs, dg, *, seed, steps, lr, batch, big, loss="ratio", wc_steps=None,
                  wc_lr=None, polish_steps=POLISH_STEPS):
    """A constant-curvature fit on the ratio loss (steps at lr); loss "wc": then fine-tuned on the wc loss
    (wc_steps at wc_lr) and on the sharp wc loss (WC_SHARP_STEPS at WC_SHARP_LR), and a single factor then
    polished on the exact D_wc (polish_steps bundle steps, as a ChartEmbedding) and rescaled to its lowest
    D_avg (ChartEmbedding.fit_scale: D_wc is blind to scale). Returns (model, training
    loss (LAST_STAGE[loss]) at the start of its sharp (or ratio) stage)."""
    factors = parse_manifold(manifold, dim)
    model = ConstantCurvature(graph.n, factors, None if big else shortest_paths(graph), seed=seed)
    losses = fit(model, pairs, dg, steps=steps, lr=lr, batch=batch, seed=seed,
                 desc=f"{graph.name} {manifold}") if steps else [math.nan]
    stages = [(loss, wc_steps or WC_STEPS, wc_lr or WC_LR), (LAST_STAGE[loss], WC_SHARP_STEPS, WC_SHARP_LR)]
    for stage, n, rate in stages if loss != "ratio" and steps else []:
        losses = fit(model, pairs, dg, steps=n, lr=rate, batch=batch, seed=seed,
                     desc=f"{graph.name} {manifold} {stage}", loss=stage, hard=_hard(loss, batch))
    if loss != "ratio" and steps and len(factors) == 1 and polish_steps:
        model = ChartEmbedding(*to_conformal_chart(model))
        polish_wc(model, pairs, dg, steps=polish_steps, desc=f"{graph.name} {manifold} polish")
        model.fit_scale(pairs, dg)
    return model, losses[0]


def _evaluate(model, graph, eval_pairs, eval_dg, chunk, loss="ratio"):
    """D_wc, D_avg, mAP (all pairs only), training loss (named by loss) and non-converged pairs of a model."""
    d, nonconv = all_distances(model, eval_pairs, chunk=chunk)
    out = distortion(d, eval_dg)
    out["map"] = None
    if len(eval_pairs) == graph.n * (graph.n - 1) // 2:
        full = np.zeros((graph.n, graph.n))
        full[eval_pairs[:, 0], eval_pairs[:, 1]] = d
        out["map"] = mean_average_precision(full + full.T, graph.adjacency())
    out["loss"] = float(get_loss(loss)(torch.as_tensor(d), torch.as_tensor(eval_dg)))
    out["nonconverged_pairs"] = nonconv
    return out


# Deep on the sphere base: the farthest a node may lie from the stereographic chart's centre. sphere100 dim 2
# (nodes up to 0.945 pi away, where the chart metric is ~1e3 times smaller than at the centre): 155 of 4560
# log maps did not converge at the start (8 RK4 steps) and D_wc was 7.9 against the fit's 2.22.
SPHERE_CHART_MAX_ANGLE = 0.6 * math.pi
# ... and on the Poincare ball base, the farthest from the centre (unit-curvature length; 1 - |x| is then about
# 2 exp(-15) = 6e-7). tree6 dim 5's sharp wc fit (14.7) converges at the evaluation RK4 grid but not at the
# training one. Polishing lets a tree's fit spread without bound (its D_wc falls towards 1 as the curvature grows):
# at tree6 dim 2 to 1 - |x| = 4e-11 (~24), where 7 of Deep's 21 log maps did not converge at its start.
BALL_MAX_RADIUS = 15.0


def _deep_start(base, base_res, eval_pairs, eval_dg):
    """A constant-curvature fit -> (conformal base, chart coordinates [n, d], scale, D_wc at Deep's
    start, shrink delta): a sphere fit with (nearly) antipodal nodes is first pulled off the cut locus
    (embeddings.pull_from_cut_locus), and a hyperbolic fit with nodes farther than BALL_MAX_RADIUS from
    the ball's centre pulled in (every node's distance from the centre times 1 - delta), both at some
    cost in distortion; other fits start at their own D_wc. Raises ValueError for a sphere fit that
    cannot be pulled off or whose nodes spread beyond SPHERE_CHART_MAX_ANGLE from the chart's centre."""
    conformal, x0, scale = to_conformal_chart(base)
    if conformal == "poincare":
        z = chart_params(x0, conformal)
        far = float(z.norm(dim=1).max())
        if far > BALL_MAX_RADIUS:
            delta = 1 - BALL_MAX_RADIUS / far
            pulled = ChartEmbedding(conformal, chart_points((1 - delta) * z, conformal), scale)
            d = pulled(torch.as_tensor(eval_pairs)).detach().numpy()
            return conformal, pulled.x.detach(), scale, distortion(d, eval_dg)["d_wc"], delta
    if conformal != "sphere":
        return conformal, x0, scale, base_res["d_wc"], 0.0
    z, delta = pull_from_cut_locus(chart_params(x0, conformal))
    far = float(z.norm(dim=1).max())
    if far > SPHERE_CHART_MAX_ANGLE:
        raise ValueError(f"its nodes cover the sphere (up to {far / math.pi:.2f} pi from the chart's centre, "
                         f"more than {SPHERE_CHART_MAX_ANGLE / math.pi:.2f} pi), where the stereographic chart "
                         "is too ill-conditioned for the log map")
    if delta == 0.0:
        return conformal, x0, scale, base_res["d_wc"], 0.0
    d = scale * sphere_angles(z)[eval_pairs[:, 0], eval_pairs[:, 1]]
    return conformal, chart_points(z, conformal), scale, distortion(d.numpy(), eval_dg)["d_wc"], delta


def deep_ode_steps(conformal, scale, longest):
    """RK4 steps of the exp map for Deep training: 8 on the flat base; on a curved base about 1.6 per
    unit-curvature length of the longest geodesic (its length `longest` / scale), at least 8 (the exp
    map's relative error is then about 1e-3 or less; evaluation uses twice as many)."""
    if conformal == "euclidean":
        return 8
    return max(8, math.ceil(1.6 * longest / scale))


def embed(graph, manifold, dim, *, seed=0, steps=None, lr=0.05, batch=None, deep_steps=100,
          deep_batch=None, deep_lr=None, hidden=32, log_steps=None, eval_log_steps=None,
          init="euclidean", fitted=None, deep_eval_every=None, loss="ratio", wc_steps=None, wc_lr=None,
          polish_steps=POLISH_STEPS):
    """Fit one embedding of a Graph. Returns (result dict with the CLI's JSON fields, model).

    loss: the training loss schedule (a key of LAST_STAGE), for every model: "ratio", or "wc"
    (constant-curvature fits on the ratio loss, then wc_steps more on the wc loss from wc_lr, then
    WC_SHARP_STEPS on the sharp wc loss, then polish_steps bundle steps on the exact D_wc for a single factor;
    Deep starts from such a fit and trains on the sharp wc loss); the
    reported losses are the last stage's, and each stage keeps its iterate with the lowest objective
    (embeddings.SELECT: the exact D_wc under "wc").

    Deep (manifold 'deep') starts from the constant-curvature fit(s) named by init (INITS; the one
    with the lowest D_wc at Deep's start: a sphere fit is first pulled off the cut locus, and skipped
    when it covers the sphere, see _deep_start), mapped to a conformal chart, with the learned metric a
    correction (I at start) of that fit's metric; 'identity':
    A = I and nodes from classical MDS. fitted: an optional dict (manifold -> (model, result)) of
    constant-curvature fits of the same graph, dim, seed and loss to reuse. deep_eval_every: steps
    between Deep's full-pair loss evaluations with sampled batches (default deep_steps // 5; the kept
    iterate is the one with the lowest, see embeddings.fit)."""
    t0 = time.time()
    if loss not in LAST_STAGE:  # an unknown name fails here, before any training
        raise ValueError(f"unknown loss {loss!r}: choose from {list(LAST_STAGE)}")
    last = LAST_STAGE[loss]
    torch.manual_seed(seed)
    deep = manifold == "deep"
    big = graph.n * (graph.n - 1) // 2 > ALL_PAIRS_MAX
    pairs, dg, eval_pairs, eval_dg = _pairs(graph, seed, 20_000 if deep else None)
    if batch is None and big:
        batch = 4096
    steps = steps or (5000 if big else 3000)
    fit_opts = dict(seed=seed, steps=steps, lr=lr, batch=batch, big=big, loss=loss, wc_steps=wc_steps, wc_lr=wc_lr,
                    polish_steps=polish_steps)
    extra = {}
    if not deep:
        model, start_loss = _fit_constant(graph, manifold, dim, pairs, dg, **fit_opts)
    else:
        if init not in INITS:
            raise ValueError(f"unknown Deep init {init!r}: choose from {list(INITS)}")
        fitted = {} if fitted is None or init == "identity" else fitted
        cands = INITS[init] or ["euclidean"]
        for m in cands:
            if m not in fitted:
                opts = {**fit_opts, "steps": 0} if init == "identity" else fit_opts
                base, loss0 = _fit_constant(graph, m, dim, pairs, dg, **opts)
                fitted[m] = (base, {**_evaluate(base, graph, eval_pairs, eval_dg, 200_000, last), "loss_start": loss0})
        starts, refused = {}, []
        for m in cands:
            try:
                starts[m] = _deep_start(*fitted[m], eval_pairs, eval_dg)
            except ValueError as err:  # a fit that cannot be used as Deep's base
                refused.append(f"the {m} fit: {err}")
        if not starts:
            raise ValueError(f"Deep cannot start from {'; '.join(refused)}; use another --init")
        chosen = min(starts, key=lambda m: starts[m][3])
        base, base_res = fitted[chosen]
        conformal, x0, scale, start_d_wc, shrink = starts[chosen]
        with torch.no_grad():  # the longest geodesic of the start: a polished fit's distances exceed d_G's scale
            longest = float(ChartEmbedding(conformal, x0, scale)(torch.as_tensor(eval_pairs)).max())
        log_steps = log_steps or deep_ode_steps(conformal, scale, longest)
        eval_log_steps = eval_log_steps or 2 * log_steps
        model = DeepEmbedding(graph.n, dim, init=x0, hidden=hidden, seed=seed, conformal=conformal, scale=scale,
                              steps=eval_log_steps)
        at_start = _evaluate(model, graph, eval_pairs, eval_dg, 2000, last)  # also warm-starts every pair's log map
        model.log_opts["steps"] = log_steps
        finetune = conformal == "euclidean" and init != "identity"
        deep_lr = deep_lr or (DEEP_FINETUNE_LR if finetune else DEEP_LR[conformal])
        opt = torch.optim.Adam([{"params": [model.z], "lr": deep_lr[0]},
                                {"params": model.metric.parameters(), "lr": deep_lr[1]}])
        checks, deep_batch = [], deep_batch or DEEP_BATCH
        fit(model, pairs, dg, steps=deep_steps, batch=deep_batch, seed=seed, optimizer=opt, desc=f"{graph.name} deep",
            eval_every=deep_eval_every or max(1, deep_steps // 5), eval_chunk=2000, checks=checks, loss=last,
            hard=_hard(loss, deep_batch))
        model.log_opts["steps"] = eval_log_steps
        start_loss = at_start["loss"]
        extra = {"init": init, "init_manifold": chosen, "init_conformal": conformal, "init_scale": scale,
                 "init_d_wc": base_res["d_wc"], "init_shrink": shrink,
                 "init_start_d_wc": start_d_wc, "d_wc_start": at_start["d_wc"],
                 "ode_steps": log_steps,
                 "eval_ode_steps": eval_log_steps, "deep_steps": deep_steps, "deep_lr": list(deep_lr)}
        if checks:  # sampled batches: the full-pair training losses and the kept iterate
            extra.update(full_losses=[[t, round(v, 8)] for t, v, _ in checks],
                         selected_step=min(checks, key=lambda c: c[2])[0])
    res = _evaluate(model, graph, eval_pairs, eval_dg, 2000 if deep else 200_000, last)
    dims = sum(k for _, k in parse_manifold(manifold, dim)) if not deep else dim
    return {
        "graph": graph.name, "nodes": graph.n, "edges": int(len(graph.edges)), "dim": dims,
        "manifold": manifold, "seed": seed, "loss": loss, "d_wc": res["d_wc"], "d_avg": res["d_avg"], "map": res["map"],
        "loss_start": start_loss, "loss_end": res["loss"],
        "seconds": round(time.time() - t0, 2), "nonconverged_pairs": res["nonconverged_pairs"],
        "eval_pairs": int(len(eval_pairs)), "substitute": graph.substitute, "note": graph.note, **extra,
    }, model


def _embed_cmd(args):
    graph = load_graph(args.graph, largest_component=args.largest_component)
    manifold = args.manifold
    dim = args.dim
    if manifold.startswith("product:"):
        dim = sum(k for _, k in parse_manifold(manifold, dim))
    elif dim is None:
        sys.exit("--dim is required (except for product:SPEC, whose factors give it)")
    res, model = embed(graph, manifold, dim, seed=args.seed, steps=args.steps, lr=args.lr,
                       batch=args.batch, deep_steps=args.deep_steps, deep_batch=args.deep_batch, init=args.init,
                       deep_eval_every=args.deep_eval_every, loss=args.loss, wc_steps=args.wc_steps, wc_lr=args.wc_lr,
                       polish_steps=args.polish_steps)
    if args.save:
        out = results_dir(f"embed-{graph.name}-{manifold.replace(':', '_')}-d{dim}-s{args.seed}")
        save_json(res, out / "result.json")
        torch.save(model.state_dict(), out / "model.pt")
        print(f"results in {out}", file=sys.stderr)
    emit(res, args.json, columns=["graph", "nodes", "dim", "manifold", "d_wc", "d_avg", "map", "seconds",
                                  "nonconverged_pairs", "substitute"])


def add_commands(sub):
    p = sub.add_parser("embed", help="embed a graph in a constant-curvature or learned (deep) manifold")
    p.add_argument("--graph", required=True,
                   help=f"built-in name {sorted([*BUILTINS, *REAL])} or path of an edge list (.gz ok)")
    p.add_argument("--dim", type=int, help="dimension (products: taken from the SPEC)")
    p.add_argument("--manifold", default="euclidean",
                   help="euclidean | poincare | lorentz | sphere | product:SPEC (e.g. product:P5xS5) | deep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="Riemannian Adam steps (default 3000; 5000 on big graphs)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch", type=int, help="pairs a step (default all pairs; 4096 on big graphs)")
    p.add_argument("--deep-steps", type=int, default=100, help="joint node + metric steps of Deep")
    p.add_argument("--deep-batch", type=int, help=f"pairs (log maps) a Deep step (default {DEEP_BATCH})")
    p.add_argument("--deep-eval-every", type=int, help="with sampled Deep batches: steps between evaluations "
                   "of the loss on all training pairs; the iterate with the lowest is kept (default deep-steps / 5)")
    p.add_argument("--init", choices=list(INITS), default="euclidean",
                   help="Deep's start: the learned metric corrects the metric of this constant-curvature fit "
                   "(poincare: the better of the Poincare and Lorentz fits; best: the lowest D_wc of all four) "
                   "and the nodes start at its embedding; identity: A = I, nodes from classical MDS "
                   "(default euclidean: the Euclidean fit, A = I)")
    p.add_argument("--loss", choices=list(LAST_STAGE), default="ratio",
                   help="training loss of every model: ratio, mean (d/d_G - 1)^2; wc, a smooth log worst-case "
                   f"distortion (tau {WC_TAU}) plus {WC_RATIO_WEIGHT} x ratio (constant-curvature fits: ratio, "
                   f"then --wc-steps on wc, then {WC_SHARP_STEPS} on the sharp wc loss, tau {WC_SHARP_TAU} and no "
                   "ratio term, then --polish-steps on the exact D_wc; Deep starts from such a fit and trains on the "
                   "sharp loss); each stage keeps its "
                   "iterate with the lowest objective (the ratio loss, or the exact D_wc under wc)")
    p.add_argument("--wc-steps", type=int, help=f"--loss wc: steps on the wc loss after the ratio fit "
                   f"(default {WC_STEPS})")
    p.add_argument("--wc-lr", type=float, help=f"--loss wc: their initial learning rate (default {WC_LR})")
    p.add_argument("--polish-steps", type=int, default=POLISH_STEPS, help="--loss wc: proximal bundle steps on the "
                   f"exact D_wc that end a single-factor fit, in its conformal chart (default {POLISH_STEPS}; 0: none)")
    p.add_argument("--largest-component", action="store_true", help="embed the largest component of a "
                   "disconnected graph (otherwise an error)")
    p.add_argument("--save", action="store_true", help="write result.json and model.pt to a results folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_embed_cmd)


# the loss of every model in `bilevel reproduce graph-embedding` (docs/graph_embedding.md: measured)
REPRODUCE_LOSS = "wc"


def _mean_std(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def reproduce(quick, outdir, graphs=None, dims=None, seeds=None, baselines=None, deep=None, inits=None,
              loss=REPRODUCE_LOSS, **opts):
    """Runs every (graph, dim, seed, manifold) and Deep from each init in inits (its constant-curvature
    starts reuse the baseline fits of the same seed), every model trained on loss; rows: best constant
    curvature (lowest mean D_wc) and Deep per init, per (graph, dim)."""
    baselines = baselines or ["euclidean", "poincare", "lorentz", "sphere"]
    if quick:  # Deep from the best (a polished, pulled-in ball) fit of tree6 took 323-406 s here: only from E
        graphs, dims, seeds = graphs or ["tree6", "cycle10"], dims or [2], seeds or [0, 1]
        deep = deep if deep is not None else [("tree6", 2)]
        inits = inits or ["euclidean"]
        opts = {"steps": 600, "wc_steps": 600, "polish_steps": 200, "deep_steps": 10, **opts}
    else:
        graphs, dims, seeds = graphs or list(PUBLISHED), dims or list(DIMS), seeds or [0, 1, 2]
        inits = inits or ["euclidean", "best"]
        deep = deep if deep is not None else [(g, k) for g in graphs for k in dims]
    runs, substitute = [], {}
    with open(outdir / "runs.jsonl", "w") as log:
        for g in graphs:
            graph = load_graph(g)
            substitute[g] = graph.substitute
            for k in dims:
                for s in seeds:
                    fitted = {}
                    todo = [(m, {}) for m in baselines] + [("deep", {"init": i}) for i in inits if (g, k) in deep]
                    for m, extra in todo:
                        res, model = embed(graph, m, k, seed=s, fitted=fitted, loss=loss, **extra, **opts)
                        if m != "deep":
                            fitted[m] = (model, res)
                        runs.append(res)
                        log.write(json.dumps(res) + "\n")
                        log.flush()
    rows = []
    for g in graphs:
        for k in dims:
            pub = PUBLISHED.get(g)
            col = DIMS.index(k) if k in DIMS else None
            cell = [r for r in runs if (r["graph"], r["dim"]) == (g, k)]
            by = {m: [r["d_wc"] for r in cell if r["manifold"] == m] for m in baselines}
            by.update({f"deep:{i}": [r["d_wc"] for r in cell if r.get("init") == i] for i in inits})
            stats = {m: _mean_std(v) for m, v in by.items() if v and all(map(math.isfinite, v))}
            base = {m: s for m, s in stats.items() if not m.startswith("deep")}
            setting = f"{g} dim {k}, {loss} loss" + (" (substitute)" if substitute[g] else "")
            if base:
                m = min(base, key=lambda m: base[m][0])
                mean, std = base[m]
                rows.append({"experiment": "graph-embedding", "setting": setting, "loss": loss,
                             "metric": "D_wc best constant curvature"
                             + (f" (talk: {pub[1][col]})" if pub and col is not None else ""),
                             "ours": f"{mean:.3f} ± {std:.3f} ({LETTER.get(m, m)})",
                             "published": pub[0][col] if pub and col is not None else None,
                             "mean": mean, "std": std, "manifold": m,
                             "all": {LETTER[b]: base[b][0] for b in base}})
            for i in inits:
                if f"deep:{i}" not in stats:
                    continue
                mean, std = stats[f"deep:{i}"]
                mine = [r for r in cell if r.get("init") == i]
                rows.append({"experiment": "graph-embedding", "setting": setting, "loss": loss,
                             "metric": f"D_wc Deep (init {i})",
                             "ours": f"{mean:.3f} ± {std:.3f}"
                             + (f" from {','.join(sorted({LETTER[r['init_manifold']] for r in mine}))}"),
                             "published": pub[2][col] if pub and col is not None else None,
                             "mean": mean, "std": std, "manifold": "deep", "init": i,
                             "d_wc_start": [r["d_wc_start"] for r in mine],
                             "nonconverged_pairs": sum(r["nonconverged_pairs"] for r in mine)})
    return rows


register("graph-embedding", reproduce)
