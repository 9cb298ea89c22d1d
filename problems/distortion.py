"""Embedding quality (Gu et al. 2019): worst-case and average distortion, mean average precision."""
import numpy as np
from scipy.stats import rankdata


def distortion(d, d_graph):
    """d, d_graph: [P] embedding and graph distances of the same pairs (d_graph > 0).
    Returns {"d_wc": max(d/d_G) * max(d_G/d) >= 1 (inf if some d == 0), "d_avg": mean |d - d_G| / d_G}."""
    d, dg = np.asarray(d, dtype=np.float64), np.asarray(d_graph, dtype=np.float64)
    if d.shape != dg.shape or d.ndim != 1 or d.size == 0:
        raise ValueError(f"d and d_graph must be non-empty [P] arrays of one shape, "
                         f"got {d.shape}, {dg.shape}")
    if not (np.isfinite(d).all() and np.isfinite(dg).all()):
        raise ValueError("distances contain NaN or inf (an unconverged solver or a disconnected graph?)")
    if (dg <= 0).any() or (d < 0).any():
        raise ValueError("graph distances must be > 0 (pairs of distinct nodes) and embedding distances >= 0")
    ratio = d / dg
    d_wc = np.inf if (d == 0).any() else float(ratio.max() / ratio.min())
    return {"d_wc": d_wc, "d_avg": float(np.mean(np.abs(ratio - 1)))}


def mean_average_precision(dist, adjacency):
    """mAP of graph neighbourhoods. dist: [n, n] embedding distances; adjacency: [n, n] 0/1 (dense or
    scipy sparse). For node a and neighbour b, precision = |N(a) within the ball B(a, d(a, b))| / |ball|
    (ball without a); AP(a) = mean over b; mAP = mean over nodes with neighbours. Ties count as inside."""
    dist = np.asarray(dist, dtype=np.float64)
    adj = adjacency.toarray() if hasattr(adjacency, "toarray") else np.asarray(adjacency)
    n = dist.shape[0]
    if dist.shape != (n, n) or adj.shape != (n, n):
        raise ValueError(f"dist and adjacency must be [n, n], got {dist.shape}, {adj.shape}")
    d = dist.copy()
    np.fill_diagonal(d, np.inf)
    adj = (adj != 0) & ~np.eye(n, dtype=bool)
    # rank of each node among a's others = number of nodes j != a with d(a, j) <= d(a, b) (ties inside)
    rank = rankdata(d, method="max", axis=1)
    # among neighbours only (others at inf): neighbours b' with d(a, b') <= d(a, b)
    inside = rankdata(np.where(adj, d, np.inf), method="max", axis=1)
    prec = np.where(adj, inside / rank, 0.0)
    deg = adj.sum(1)
    has = deg > 0
    return float(np.mean(prec[has].sum(1) / deg[has]))
