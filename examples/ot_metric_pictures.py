"""One picture per OT benchmark: the snapshots, the true cheap directions beside the learned ones over the
scoring grid, and a few geodesics under the learned metric.

    .venv/bin/python examples/ot_metric_pictures.py [--method lagrangian|scarvelis] [--quick]

Writes results/ot-pictures-*/<dataset>.png (never overwrites).
"""
import argparse

import torch

from problems.ot_cli import METHODS, setting
from problems.ot_data import DATASETS, make_dataset
from problems.ot_metric import GRIDS, alignment, cheap_direction, true_metric
from problems.report import results_dir
from solvers.path_energy import geodesic_path


def picture(name, method, quick, path, seed=0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snaps = make_dataset(name, seed)
    res = METHODS[method](snaps, seed=seed, **setting(method, name, quick))
    metric = res.metric
    (x0, x1), (y0, y1) = GRIDS[name]
    g = torch.stack(torch.meshgrid(torch.linspace(x0, x1, 20, dtype=torch.float64),
                                   torch.linspace(y0, y1, 20, dtype=torch.float64), indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        learned = cheap_direction(metric(g))
    true = cheap_direction(true_metric(name)(g))
    # a few geodesics under the learned metric: first-snapshot samples to last-snapshot samples
    K, T = snaps.shape[:2]
    xs = torch.cat([snaps[k, 0, :3] for k in range(K)])
    ys = torch.cat([snaps[k, min(T - 1, T // 4 if name == "circle" else T - 1), :3] for k in range(K)])
    with torch.no_grad():
        geo = geodesic_path(metric, xs, ys, n_nodes=33, max_iter=300).path
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    for ax, dirs, title in ((axes[0], true, "true cheap directions"),
                            (axes[1], learned, f"learned ({method}): alignment {alignment(name, metric):.3f}")):
        for k in range(K):
            for t in range(T):
                ax.scatter(*snaps[k, t].T, s=3, color=plt.cm.viridis(t / max(T - 1, 1)), alpha=0.5)
        ax.quiver(g[:, 0], g[:, 1], dirs[:, 0], dirs[:, 1], pivot="middle", headwidth=1, headlength=0,
                  color="k", alpha=0.6)
        ax.set_title(f"{name}: {title}")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_aspect("equal" if name != "mass_splitting" else "auto")
    for p in geo:
        axes[1].plot(p[:, 0], p[:, 1], color="crimson", lw=1.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=list(METHODS), default="lagrangian")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = results_dir("ot-pictures")
    for name in args.datasets:
        picture(name, args.method, args.quick, out / f"{name}-{args.method}.png")
        print(out / f"{name}-{args.method}.png")


if __name__ == "__main__":
    main()
