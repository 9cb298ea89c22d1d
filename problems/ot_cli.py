"""`bilevel ot-metric` and `bilevel reproduce ot-metric`: metric learning from snapshots by OT."""
import statistics
import time
import warnings

import numpy as np
import torch

from . import registry
from .ot_data import DATASETS, consecutive_pairs, get_dataset
from .ot_metric import GRIDS, alignment, fit_lagrangian, fit_scarvelis, gradient_gap
from .report import emit, results_dir, save_json

METHODS = {"scarvelis": fit_scarvelis, "lagrangian": fit_lagrangian}
# settings per method: "quick" (all of `reproduce --quick` within ~3 minutes on 2 cores) and "full"
SETTINGS = {
    "scarvelis": {"quick": dict(rounds=1, phi_epochs=150, r_epochs=400, n_mix=1),
                  "full": dict(rounds=1, phi_epochs=300, r_epochs=1500, n_mix=2)},
    "lagrangian": {"quick": dict(steps=120, batch=8, n_nodes=5, inner_iter=15, lr_metric=2e-2, warmup=15,
                             box_margin=0.25),
                   "full": dict(steps=200, batch=32, n_nodes=6, inner_iter=20, lr_metric=1e-2, warmup=20,
                            box_margin=0.25, metric_activation="leaky_relu", metric_hidden=128,
                            metric_init="zero_bias", centre=False)},
}
# per-dataset changes to a setting, (method, "quick"|"full", dataset) -> overrides (measured in docs/ot_metric.md):
# mass splitting has 9 pairs (x paths 18, circle 24), so 64 samples a pair make as many inner problems a step
# (576) as x paths' 32; they lift it from 0.962 +- 0.016 to 0.978 +- 0.003 (x paths gained nothing from 100).
DATASET_SETTINGS = {("lagrangian", "full", "mass_splitting"): dict(batch=64)}
PUBLISHED = {"scarvelis": {"circle": 0.995, "mass_splitting": 0.839, "x_paths": 0.916},
             "lagrangian": {"circle": 0.997, "mass_splitting": 0.986, "x_paths": 0.957}}


def setting(method, name, quick=False):
    """The keyword arguments of METHODS[method] on dataset `name` (a benchmark, or a file's stem)."""
    level = "quick" if quick else "full"
    return {**SETTINGS[method][level], **DATASET_SETTINGS.get((method, level, name), {})}


def holdout_w1(model, snaps, k):
    """W1 (POT, Euclidean ground cost) between the held-out snapshot k of trajectory 0 and the geodesic
    midpoints of the learned transport from snapshot k-1 to k+1, beside the Euclidean-OT
    (displacement interpolation) midpoints. model: a LagrangianModel fitted on snaps without time k."""
    import ot

    src, mid, dst = snaps[0, k - 1], snaps[0, k], snaps[0, k + 1]
    pair = k - 1  # index of the pair (k-1, k+1) of trajectory 0 once time k is removed
    P = model.potential.W[0].shape[0]
    x = torch.zeros(P, src.shape[0], src.shape[1], dtype=src.dtype)
    x[pair] = src
    res, paths = model.transport(x, max_iter=100, tol=1e-7)
    path = paths[pair]
    T = path.shape[1] - 1
    pred = 0.5 * (path[:, T // 2] + path[:, (T + 1) // 2])
    a = np.full(src.shape[0], 1 / src.shape[0])
    w1 = lambda p: float(ot.emd2(a, a, ot.dist(p.numpy(), mid.numpy(), metric="euclidean")))
    plan = ot.emd(a, a, ot.dist(src.numpy(), dst.numpy()))
    mccann = 0.5 * (src.numpy() + src.shape[0] * plan @ dst.numpy())
    return {"w1_heldout": w1(pred.detach()), "w1_heldout_euclidean_ot": w1(torch.from_numpy(mccann)),
            "w1_heldout_no_motion": w1(src)}


def run_one(dataset, method, seed=0, quick=False, holdout=None, outdir=None, backward="envelope"):
    """Fit one method on one dataset -> dict of figures (the CLI's JSON object). backward: how the
    Lagrangian method differentiates through the c-transform ('envelope' or 'implicit')."""
    name, snaps = get_dataset(dataset, seed=seed)
    train = snaps
    if holdout is not None:
        if method != "lagrangian":
            raise SystemExit("--holdout needs --method lagrangian (the method with a transport map)")
        if not 0 < holdout < snaps.shape[1] - 1:
            raise SystemExit(f"--holdout must be a middle time in 1..{snaps.shape[1] - 2}, got {holdout}")
        train = torch.cat([snaps[:, :holdout], snaps[:, holdout + 1:]], 1)
    opts = setting(method, name, quick)
    if method == "lagrangian":
        opts["backward"] = backward
    t0 = time.time()
    res = METHODS[method](train, seed=seed, **opts)
    out = {"dataset": name, "method": method, "seed": seed, "setting": "quick" if quick else "full",
           **({"backward": backward} if method == "lagrangian" else {}),
           "alignment": alignment(name, res.metric) if name in GRIDS else None,
           "seconds": time.time() - t0}
    if method == "lagrangian":
        src, dst = consecutive_pairs(train)
        sub = src[:, :16]
        with warnings.catch_warnings():   # the implicit side warns when the inner solve is loose
            warnings.simplefilter("ignore")
            gap_train, res_train = gradient_gap(res.extra["model"], sub, dst, max_iter=opts["inner_iter"], tol=1e-5)
        gap_tight, res_tight = gradient_gap(res.extra["model"], sub, dst)
        out.update(unconverged_inner_fraction=res.extra["unconverged_inner_fraction"],
                   grad_gap_training_tol=gap_train, inner_residual_training_tol=res_train,
                   grad_gap_tight_tol=gap_tight, inner_residual_tight_tol=res_tight)
    if holdout is not None:
        out.update(holdout=holdout, **holdout_w1(res.extra["model"], snaps, holdout))
    if outdir is not None:
        torch.save(res.metric.state_dict(), outdir / f"{name}-{method}-seed{seed}.pt")
    return out


def _cmd(args):
    torch.set_num_threads(args.threads)
    outdir = results_dir("ot-metric")
    out = run_one(args.dataset, args.method, args.seed, args.quick, args.holdout, outdir, args.backward)
    save_json(out, outdir / "result.json")
    emit(out, args.json)


def add_commands(sub):
    p = sub.add_parser("ot-metric", help="learn a metric from population snapshots by optimal transport")
    p.add_argument("--dataset", default="circle", help=f"one of {', '.join(DATASETS)} or a .npy/.npz file "
                   "of snapshots [time, sample, dim]")
    p.add_argument("--method", choices=list(METHODS), default="lagrangian")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="the short setting (seconds, lower alignment)")
    p.add_argument("--holdout", type=int, default=None,
                   help="hold out this middle time and report W1 of the predicted snapshot (lagrangian)")
    p.add_argument("--backward", choices=["envelope", "implicit"], default="envelope",
                   help="lagrangian: gradients through the c-transform by the envelope theorem or implicitly")
    p.add_argument("--threads", type=int, default=1, help="torch threads (small tensors: 1 is fastest)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd)


def reproduce(quick, outdir):
    """The talk's OT alignment table (DESIGN.md section 8) beside ours: mean +- std over 3 seeds in
    the full setting, one seed in the quick one."""
    torch.set_num_threads(1)  # `bilevel reproduce` restores the thread count afterwards
    seeds = [0] if quick else [0, 1, 2]
    rows = []
    for method in METHODS:
        for name in DATASETS:
            runs = [run_one(name, method, s, quick, outdir=outdir) for s in seeds]
            scores = [r["alignment"] for r in runs]
            ours = f"{statistics.mean(scores):.3f}" + (f" +- {statistics.stdev(scores):.3f}" if len(scores) > 1 else "")
            rows.append({"experiment": "ot-metric", "setting": f"{method} {name} ({'quick' if quick else 'full'}, "
                         f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}, {sum(r['seconds'] for r in runs):.0f} s)",
                         "metric": "alignment", "ours": ours, "published": PUBLISHED[method][name]})
    return rows


registry.register("ot-metric", reproduce)
