"""`bilevel taskmet ...` (one run) and `bilevel reproduce taskmet` (the talk's table)."""
import statistics
import time

import torch

from .. import registry
from ..report import emit, progress, results_dir, save_json
from .data import PROBLEMS
from .methods import METHODS, run

# Schedules. full: close to the published ones (TaskMet: 500 inner Adam steps, then 100 warm-started
# per outer step; the outer learning rate is raised from 1e-3 to 1e-2 to fit a CPU budget; the MLP
# predictors' inner fit has weight decay wd, see train_taskmet).
# quick: short schedules for `reproduce --quick`.
SETTINGS = {
    "cubic": {
        "full": {"direct": {"epochs": 100, "batch": 50}, "lodl": {"n_samples": 256, "steps": 500,
                                                                  "noise": 0.1},
                 "taskmet": {"outer_steps": 100, "metric_lr": 1e-2, "ridge": 1e-3}},
        "quick": {"direct": {"epochs": 25, "batch": 50}, "lodl": {"n_samples": 256, "steps": 200,
                                                                   "noise": 0.1},
                  "taskmet": {"outer_steps": 20, "inner_steps": 50, "metric_lr": 1e-2, "ridge": 1e-3}},
    },
    "budget": {
        "full": {"direct": {"epochs": 100, "batch": 20}, "lodl": {"n_samples": 256, "steps": 500},
                 "taskmet": {"outer_steps": 100, "metric_lr": 1e-2, "ridge": 5e-2, "cg_iters": 100,
                             "wd": 1e-3}},
        "quick": {"direct": {"epochs": 25, "batch": 20}, "lodl": {"n_samples": 64, "steps": 200},
                  "taskmet": {"outer_steps": 15, "inner_steps": 50, "metric_lr": 1e-2, "ridge": 5e-2,
                              "cg_iters": 100, "wd": 1e-3}},
    },
    "portfolio": {
        "full": {"direct": {"epochs": 50, "batch": 50}, "lodl": {"n_samples": 64, "steps": 500},
                 "taskmet": {"outer_steps": 50, "metric_lr": 1e-2, "ridge": 5e-2, "cg_iters": 100,
                             "wd": 1e-3}},
        "quick": {"direct": {"epochs": 10, "batch": 50}, "lodl": {"n_samples": 16, "steps": 200},
                  "taskmet": {"outer_steps": 10, "inner_steps": 50, "metric_lr": 1e-2, "ridge": 5e-2,
                              "cg_iters": 100, "wd": 1e-3}},
    },
}

# DESIGN.md section 8: normalised DQ (higher is better), Cubic / Budget / Portfolio.
CONFIGS = [("mse", None), ("dfl", 0.0), ("dfl", 10.0), ("lodl", 0.0), ("lodl", 10.0), ("taskmet", None)]
PUBLISHED = {
    "cubic": [-0.96, 0.61, 0.62, 0.96, -0.95, 0.96],
    "budget": [0.54, 0.91, 0.81, 0.84, 0.58, 0.83],
    "portfolio": [0.33, 0.25, 0.34, 0.17, 0.30, 0.33],
}
# reproduce --quick: one seed and short schedules; Cubic and Budget with every method, Portfolio
# with MSE / DFL(10) / TaskMet.
QUICK = {"cubic": CONFIGS, "budget": CONFIGS,
         "portfolio": [("mse", None), ("dfl", 10.0), ("taskmet", None)]}
FULL_SEEDS = (0, 1, 2)


def label(method, alpha):
    return method.upper() if alpha is None else f"{method.upper()}({alpha:g})"


def _one(args):
    torch.set_num_threads(args.threads)
    alpha = args.alpha if args.method in ("dfl", "lodl") else None
    if args.method in ("dfl", "lodl") and alpha is None:
        alpha = 0.0
    task = PROBLEMS[args.problem](args.seed, **({"qp": args.qp} if args.problem == "portfolio" else {}))
    settings = SETTINGS[args.problem]["quick" if args.quick else "full"]
    settings = {**settings, "taskmet": {**settings["taskmet"], "backward": args.backward}}
    if args.wd is not None:
        settings = {**settings, **{k: {**settings[k], "wd": args.wd} for k in ("direct", "taskmet")}}
    out, *_ = run(task, args.method, alpha, args.seed, settings)
    out["quick"] = args.quick
    save_json(out, results_dir(f"taskmet-{args.problem}-{args.method}") / "result.json")
    emit(out, args.json, rows=[out], columns=["problem", "method", "alpha", "seed", "dq", "mse", "seconds"])


def add_commands(sub):
    p = sub.add_parser("taskmet", help="TaskMet / DFL / LODL / MSE on a predict-then-optimise problem")
    p.add_argument("--problem", choices=sorted(PROBLEMS), required=True)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--alpha", type=float, default=None, help="MSE weight for dfl/lodl (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="short schedule")
    p.add_argument("--qp", choices=["torch", "cvxpylayers"], default="torch",
                   help="portfolio training layer: batched torch solver or cvxpylayers")
    p.add_argument("--backward", choices=["implicit", "unrolled"], default="implicit",
                   help="TaskMet: implicit gradient (CG on Hessian-vector products) or unrolled inner steps")
    p.add_argument("--wd", type=float, default=None,
                   help="weight decay of the predictor's fit (default: 1e-3 in TaskMet's inner fit of "
                        "the MLP predictors, 0 for the other methods, as published)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (small ops: 1 is fastest)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_one)


def reproduce(quick, outdir):
    """The talk's TaskMet table: our mean (std) DQ over seeds beside the published numbers."""
    torch.set_num_threads(1)  # `bilevel reproduce` restores the thread count afterwards
    plan = QUICK if quick else {p: CONFIGS for p in PROBLEMS}
    seeds = (0,) if quick else FULL_SEEDS
    jobs = [(p, m, a, s) for p, cfgs in plan.items() for s in seeds for m, a in cfgs]
    results, tasks, cache = [], {}, {}
    t0 = time.time()
    for p, m, a, s in progress(jobs, desc="taskmet"):
        if (p, s) not in tasks:
            tasks[p, s] = PROBLEMS[p](s)
        r, *_ = run(tasks[p, s], m, a, s, SETTINGS[p]["quick" if quick else "full"], cache)
        results.append(r)
        save_json(results, outdir / "runs.json")
    rows = []
    for p, cfgs in plan.items():
        for (m, a) in cfgs:
            rs = [r for r in results if r["problem"] == p and r["method"] == m and r["alpha"] == a]
            dq = [r["dq"] for r in rs]
            mse = [r["mse"] for r in rs]
            sd = f" +- {statistics.stdev(dq):.2f}" if len(dq) > 1 else ""
            setting = f"{p} {label(m, a)} ({len(rs)} seed{'s' if len(rs) > 1 else ''}{sd})"
            rows.append({"experiment": "taskmet", "setting": setting, "metric": "DQ",
                         "ours": statistics.mean(dq), "published": PUBLISHED[p][CONFIGS.index((m, a))]})
            rows.append({"experiment": "taskmet", "setting": setting, "metric": "test MSE",
                         "ours": statistics.mean(mse), "published": None})
    rows.append({"experiment": "taskmet", "setting": "data: " + "; ".join(
        sorted({f"{r['problem']}: {r['data']}" for r in results})), "metric": "seconds",
        "ours": time.time() - t0, "published": None})
    return rows


registry.register("taskmet", reproduce)
