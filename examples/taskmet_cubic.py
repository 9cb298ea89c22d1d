"""Cubic picture: the true y(x), the MSE fit, the TaskMet fit and TaskMet's learned metric A(x).

    .venv/bin/python examples/taskmet_cubic.py [--seed 0] [--quick]

The linear MSE fit has a negative slope, so it picks the worst item (DQ about -0.94); TaskMet
weights the items near x = 1, where the best item lies, and its fit picks it (DQ about 0.96).
Writes taskmet_cubic.png under a new results folder.
"""
import argparse

import torch

from problems.report import results_dir
from problems.taskmet.cli import SETTINGS
from problems.taskmet.data import cubic
from problems.taskmet.methods import metric_factor, predict, run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = cubic(args.seed)
    settings = SETTINGS["cubic"]["quick" if args.quick else "full"]
    fits = {m: run(task, m, None, args.seed, settings) for m in ("mse", "taskmet")}

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.linspace(-1, 1, 201, dtype=torch.float64).reshape(-1, 1)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(5, 5), sharex=True, height_ratios=[2.5, 1])
    ax.plot(x[:, 0], 10 * (x[:, 0] ** 3 - 0.65 * x[:, 0]), "k", label="true y(x)")
    for m, (out, net, params, extra) in fits.items():
        with torch.no_grad():
            ax.plot(x[:, 0], predict(task, net, params, x)[:, 0], label=f"{m.upper()} fit (DQ {out['dq']:.2f})")
    ax.set_ylabel("y")
    ax.legend(fontsize=8)
    metric, phi_net, log_s = fits["taskmet"][3]["metric"]
    with torch.no_grad():
        Lm, c = metric_factor(metric, {"net": phi_net, "log_s": log_s}, x, 1, ref=task.X["train"])
    bx.plot(x[:, 0], (Lm[:, 0, 0] ** 2 + c), color="C1")
    bx.set_xlabel("x")
    bx.set_ylabel("A(x)")
    bx.set_title("TaskMet metric (mean 1 over training x)", fontsize=9)
    fig.tight_layout()
    path = results_dir("taskmet-cubic-picture") / "taskmet_cubic.png"
    fig.savefig(path, dpi=120)
    print(path)
    for m, (out, *_) in fits.items():
        print(m, f"dq={out['dq']:.4f}", f"mse={out['mse']:.4f}")


if __name__ == "__main__":
    main()
