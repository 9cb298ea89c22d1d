"""Picture of a 2-D Deep graph embedding: nodes in R^2, graph edges drawn as geodesics of the learned
metric, and the metric drawn as ellipses {u : u^T A(x) u = r^2} (small where distances are long).

    .venv/bin/python examples/graph_embedding_picture.py --graph tree40 --deep-steps 60
    .venv/bin/python examples/graph_embedding_picture.py --graph tree40 --model results/.../model.pt

(`bilevel embed --manifold deep --dim 2 --save` writes such a model.pt.) The talk's figure shows
the Protein graph; with its substitute (`--graph protein`) expect hours on a laptop CPU.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from problems.embeddings import DeepEmbedding
from problems.graph_embedding_cli import embed
from problems.graphs import load_graph
from problems.report import results_dir
from solvers.geodesic import interpolate


def draw(model, graph, path, n_t=24, grid=14, title="", steps=16):
    """Save the picture of a 2-D DeepEmbedding of graph to path (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection, LineCollection

    x = model.x.detach()
    if x.shape[1] != 2:
        raise ValueError(f"the picture needs a 2-D embedding, got dimension {x.shape[1]}")
    i, j = torch.as_tensor(graph.edges).T
    with torch.no_grad():
        init = torch.where(model.valid[i, j, None], model.cache[i, j], x[j] - x[i])  # warm starts
        curves = interpolate(model.metric, x[i], x[j], torch.linspace(0, 1, n_t, dtype=x.dtype),
                             init=init, steps=steps)  # [T, E, 2]
        lo, hi = x.min(0).values, x.max(0).values
        pad = 0.08 * (hi - lo).max()
        lo, hi = lo - pad, hi + pad
        axes = [torch.linspace(float(lo[k]), float(hi[k]), grid, dtype=x.dtype) for k in range(2)]
        centers = torch.stack(torch.meshgrid(*axes, indexing="xy"), -1).reshape(-1, 2)
        w, V = torch.linalg.eigh(model.metric(centers))  # radii ~ 1 / sqrt(eigenvalue)
        radii = w.rsqrt()
        radii = radii * (0.45 * float((hi - lo).min()) / (grid - 1) / radii.max())
        angles = torch.rad2deg(torch.atan2(V[:, 1, 0], V[:, 0, 0]))

    fig, ax = plt.subplots(figsize=(7, 7))
    ax.add_collection(EllipseCollection(2 * radii[:, 0].numpy(), 2 * radii[:, 1].numpy(), angles.numpy(),
                                        units="xy", offsets=centers.numpy(), offset_transform=ax.transData,
                                        facecolors="none", edgecolors="0.6", linewidths=0.7))
    ax.add_collection(LineCollection(curves.permute(1, 0, 2).numpy(), colors="tab:blue", linewidths=1.0))
    ax.scatter(x[:, 0], x[:, 1], s=14, c="tab:red", zorder=3)
    ax.set_xlim(float(lo[0]), float(hi[0]))
    ax.set_ylim(float(lo[1]), float(hi[1]))
    ax.set_aspect("equal")
    ax.set_title(title or f"{graph.name}: 2-D Deep embedding, edges as geodesics, metric as ellipses")
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--graph", default="tree40")
    p.add_argument("--model", help="state dict of a 2-D DeepEmbedding of this graph (skips training)")
    p.add_argument("--deep-steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="euclidean", help="Deep's start (see bilevel embed --help)")
    args = p.parse_args(argv)
    graph = load_graph(args.graph)
    if args.model:  # the base metric is in the result.json written beside model.pt
        meta = Path(args.model).with_name("result.json")
        conformal = json.loads(meta.read_text()).get("init_conformal", "euclidean") if meta.exists() else "euclidean"
        model = DeepEmbedding(graph.n, 2, conformal=conformal)
        model.load_state_dict(torch.load(args.model))
        title = ""
    else:
        res, model = embed(graph, "deep", 2, seed=args.seed, deep_steps=args.deep_steps, init=args.init)
        title = f"{graph.name}: Deep (init {args.init}), dim 2, D_wc = {res['d_wc']:.3f}"
    out = draw(model, graph, results_dir("graph-picture") / f"{graph.name}_deep2.png", title=title)
    print(out, file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
