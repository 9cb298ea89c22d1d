"""Draw geodesics and metric ellipses of a (random) neural metric in 2-D.

    .venv/bin/python examples/geometry_picture.py [--out docs/geometry.png]

Ellipses are the metric's unit balls {u : u^T A(x) u = r^2} (long axes = cheap directions); solid
curves are geodesics from the log map (shooting), dashed lines the straight segments."""
import argparse
import math

import torch

from solvers.geodesic import interpolate
from solvers.metric import NeuralMetric


def make_metric(seed=1, scale=2.5):
    torch.manual_seed(seed)
    m = NeuralMetric(2, hidden=16, init_identity=False).double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


def draw(out, seed=1):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    metric = make_metric(seed)
    g = torch.linspace(-1.5, 1.5, 9, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g)
    with torch.no_grad():
        lam, vec = torch.linalg.eigh(metric(grid))
    fig, ax = plt.subplots(figsize=(5, 5), dpi=90)
    r = 0.12 * float(lam.min().sqrt())  # common scale: the cheapest direction's axis fits the grid
    for p, l, e in zip(grid, lam, vec):
        w, h = 2 * r / math.sqrt(float(l[0])), 2 * r / math.sqrt(float(l[1]))
        ang = math.degrees(math.atan2(float(e[1, 0]), float(e[0, 0])))
        ax.add_patch(Ellipse(p.tolist(), w, h, angle=ang, fc="#cde", ec="#58a", lw=0.6))
    ang = torch.linspace(0, 2 * math.pi, 13, dtype=torch.float64)[:-1]
    y = 1.3 * torch.stack([ang.cos(), ang.sin()], 1)
    x = torch.full_like(y, -0.2)
    t = torch.linspace(0, 1, 41, dtype=torch.float64)
    with torch.no_grad():
        path, info = interpolate(metric, x, y, t, return_info=True)
    for b in range(len(y)):
        ax.plot(path[:, b, 0], path[:, b, 1], color="#c33" if info.converged[b] else "k", lw=1.4)
        ax.plot([x[b, 0], y[b, 0]], [x[b, 1], y[b, 1]], ls="--", color="#999", lw=0.7)
    ax.plot(*x[0].tolist(), "ko", ms=4)
    ax.set_aspect("equal")
    ax.set_xlim(-1.7, 1.7)
    ax.set_ylim(-1.7, 1.7)
    ax.set_title("neural metric: unit balls and geodesics (shooting)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}; {int(info.converged.sum())}/{len(y)} log maps converged")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/geometry.png")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    draw(a.out, a.seed)
