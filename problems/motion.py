"""Geodesic motion skills on a learned pullback metric (Beik-Mohammadi, Hauberg, Arvanitidis, Neumann,
Rozo, RSS 2021).

Every point of every demonstration is a datum x in R^D. A VAE maps it to a latent z in R^2; its decoder
gives a mean mu(z) and a standard deviation sigma(z) whose precision is an RBF network in z (large on the
data, a small floor zeta away from it), so sigma grows off the data. The pullback metric
M(z) = J_mu^T J_mu + J_sigma^T J_sigma (solvers.pullback) is then large where the decoder is unsure, and a
geodesic between the latent codes of a start and a goal, decoded by mu, is a new motion that stays where
the demonstrations were. Obstacles (data-space balls) scale the metric up near them (ObstacleMetric).
"""
import math

import torch
from torch import nn

from solvers.pullback import ObstacleMetric, PullbackMetric, magnification_factor


def _mlp(n_in, n_out, hidden, act):
    return nn.Sequential(nn.Linear(n_in, hidden), act(), nn.Linear(hidden, hidden), act(),
                         nn.Linear(hidden, n_out))


class MotionVAE(nn.Module):
    """VAE on data points x [..., D] with latent z [..., d] and an RBF precision decoder.

    Data are standardised inside the model (shift, scale buffers) so mu and sigma are in data units.
    sigma(z) = scale / sqrt(rbf(z) @ exp(log_w) + zeta), rbf_k(z) = exp(-lam_k |z - c_k|^2), so far from
    every centre c_k the std tends to scale / sqrt(zeta). Smooth activations (tanh) in the decoder: the
    geodesic solvers differentiate its Jacobian.
    """

    def __init__(self, data_dim, latent_dim=2, hidden=64, n_centers=32, zeta=1e-2):
        super().__init__()
        self.data_dim, self.latent_dim, self.zeta = data_dim, latent_dim, float(zeta)
        self.encoder = _mlp(data_dim, 2 * latent_dim, hidden, nn.ELU)
        self.mean_net = _mlp(latent_dim, data_dim, hidden, nn.Tanh)
        self.log_std0 = nn.Parameter(torch.full((data_dim,), -1.0))       # stage-1 constant decoder std
        self.log_w = nn.Parameter(torch.zeros(n_centers, data_dim))
        self.register_buffer("centers", torch.zeros(n_centers, latent_dim))
        self.register_buffer("lam", torch.ones(n_centers))
        self.register_buffer("shift", torch.zeros(data_dim))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("floor_center", torch.zeros(latent_dim))
        self.register_buffer("floor_radius", torch.tensor(float("inf")))

    def encode(self, x):
        """x [..., D] -> posterior mean, std [..., d]."""
        h = self.encoder((x - self.shift) / self.scale)
        m, s = h.split(self.latent_dim, -1)
        return m, nn.functional.softplus(s) + 1e-4

    def decoder_mean(self, z):
        """z [..., d] -> mu [..., D] in data units."""
        return self.shift + self.scale * self.mean_net(z)

    def precision(self, z):
        """RBF precision (standardised units) [..., D]: rbf(z) @ exp(log_w) + floor(z), where the floor is
        zeta (the paper's constant) or, with a finite floor_radius R, zeta exp(-|z - floor_center|^2 / 2R^2),
        which keeps sigma growing far from the data instead of saturating (no flat, free far region)."""
        rbf = torch.exp(-self.lam * ((z[..., None, :] - self.centers) ** 2).sum(-1))
        sq = ((z - self.floor_center) ** 2).sum(-1, keepdim=True)
        floor = self.zeta * torch.exp(-0.5 * sq / self.floor_radius ** 2)
        return rbf @ self.log_w.exp() + floor

    def decoder_std(self, z):
        """z [..., d] -> sigma [..., D] in data units."""
        return self.scale * self.precision(z).rsqrt()

    def forward(self, z):
        """The decoder, z [..., d] -> (mu, sigma), each [..., D]: its pullback is the motion metric."""
        return self.decoder_mean(z), self.decoder_std(z)


def _kmeans(x, k, gen, iters=30):
    """Lloyd's k-means, x [N, d] -> centres [k, d], labels [N]."""
    c = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for _ in range(iters):
        lab = torch.cdist(x, c).argmin(1)
        counts = torch.bincount(lab, minlength=k).clamp_min(1).to(x)
        c = torch.zeros_like(c).index_add_(0, lab, x) / counts[:, None]
    return c, torch.cdist(x, c).argmin(1)


def fit_vae(demos, *, latent_dim=2, hidden=64, n_centers=32, zeta=1e-2, steps=2500, precision_steps=1500,
            lr=3e-3, bandwidth=1.0, kl_weight=0.1, floor_radius=1.0, seed=0, progress=None):
    """Train a MotionVAE on demos [demo, time, D] (array or tensor); returns the model (eval, float32).

    Stage 1: ELBO with a constant decoder std (encoder, mean network). Stage 2 (as in the paper): centres
    by k-means of the latent means, lam_k = 1 / (2 (bandwidth * mean member distance)^2), then only the
    RBF precision weights are fit by maximum likelihood with the mean network frozen.
    floor_radius: R of the decaying precision floor in units of the largest latent distance from the
    latent mean (None: the paper's constant floor zeta).
    progress: optional wrapper for range objects (e.g. problems.report.progress).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(demos, dtype=torch.float32).reshape(-1, demos.shape[-1])
    vae = MotionVAE(x.shape[-1], latent_dim, hidden, min(n_centers, len(x)), zeta)
    vae.shift.copy_(x.mean(0))
    vae.scale.copy_((x - x.mean(0)).pow(2).sum(-1).mean().sqrt() / math.sqrt(x.shape[-1]))
    wrap = progress or (lambda r, **kw: r)

    def nll(mu, std):
        return (((x - mu) / std) ** 2 / 2 + std.log()).sum(-1).mean()

    opt = torch.optim.Adam([*vae.encoder.parameters(), *vae.mean_net.parameters(), vae.log_std0], lr=lr)
    for _ in wrap(range(steps), desc="VAE"):
        m, s = vae.encode(x)
        z = m + s * torch.randn(m.shape, generator=gen)
        kl = 0.5 * (m ** 2 + s ** 2 - 1 - 2 * s.log()).sum(-1).mean()
        loss = nll(vae.decoder_mean(z), vae.scale * vae.log_std0.exp()) + kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        m, s = vae.encode(x)
        c, lab = _kmeans(m, len(vae.centers), gen)
        spread = torch.zeros(len(c)).index_add_(0, lab, (m - c[lab]).norm(dim=-1))
        spread = spread / torch.bincount(lab, minlength=len(c)).clamp_min(1)
        spread = torch.where(spread > 0, spread, spread[spread > 0].mean())     # empty/singleton clusters
        vae.centers.copy_(c)
        vae.lam.copy_(0.5 / (bandwidth * spread) ** 2)
        vae.floor_center.copy_(m.mean(0))
        if floor_radius is not None:
            vae.floor_radius.fill_(floor_radius * float((m - m.mean(0)).norm(dim=-1).max()))
        mu_fixed = vae.decoder_mean(m)
    opt = torch.optim.Adam([vae.log_w], lr=10 * lr)
    for _ in wrap(range(precision_steps), desc="RBF precision"):
        z = m + s * torch.randn(m.shape, generator=gen)
        loss = nll(mu_fixed, vae.decoder_std(z))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vae.eval().requires_grad_(False)


def motion_metric(vae, obstacles=None, strength=1e3, margin=0.25, eps=1e-3):
    """Pullback metric of (mu, sigma) (+ eps I); with obstacles [(center [D], radius), ...] it is scaled up
    near those data-space balls. Same dtype as the vae."""
    metric = PullbackMetric(vae, eps=eps)
    if not obstacles:
        return metric
    dtype = vae.scale.dtype
    centers = torch.stack([torch.as_tensor(c, dtype=dtype) for c, _ in obstacles])
    radii = torch.tensor([float(r) for _, r in obstacles], dtype=dtype)
    return ObstacleMetric(metric, vae.decoder_mean, centers, radii, strength=strength, margin=margin)


_OFFSETS = ((1, 0), (0, 1), (1, 1), (1, -1), (1, 2), (2, 1), (1, -2), (2, -1))


def midpoint_cost(metric):
    """Edge cost sqrt(D^T M(midpoint) D) of latent segments a -> b [N, d] under a metric."""
    def cost(a, b):
        D = b - a
        return torch.einsum("ni,nij,nj->n", D, metric(0.5 * (a + b)), D).clamp_min(0).sqrt()
    return cost


def decoder_cost(vae, metric):
    """Edge cost that sees thin uncertainty walls: |(mu, sigma)(b) - (mu, sigma)(a)| (the decoded jump,
    as in stochman's discrete curves), times the metric's obstacle factor at the midpoint if it has one,
    plus the metric's eps |b - a|."""
    inner = getattr(metric, "metric", metric)
    def cost(a, b):
        (mu_a, s_a), (mu_b, s_b) = vae(a), vae(b)
        c = (((mu_b - mu_a) ** 2).sum(-1) + ((s_b - s_a) ** 2).sum(-1) + inner.eps * ((b - a) ** 2).sum(-1)).sqrt()
        if isinstance(metric, ObstacleMetric):
            c = c * (1 + metric.strength * metric.inside(0.5 * (a + b))).sqrt()
        return c
    return cost


def graph_path(edge_cost, z0, z1, lo, hi, n_grid=64, chunk=8192):
    """Coarse global initial path: shortest path on a latent grid graph (box lo..hi [d=2], n_grid^2
    nodes, 16 neighbours) with edge_cost(a [N, 2], b [N, 2]) -> [N] (e.g. midpoint_cost(metric));
    z0, z1 [2] snap to their nearest nodes. Returns the node sequence [K, 2] from z0 to z1 (ends replaced
    by z0, z1). The path-energy solver refines it; the graph only keeps that solver out of local minima."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import dijkstra

    if z0.shape[-1] != 2:
        raise ValueError(f"graph_path needs a 2-D latent space, got d = {z0.shape[-1]}")
    axes = [torch.linspace(float(lo[k]), float(hi[k]), n_grid, dtype=z0.dtype) for k in range(2)]
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    ii, jj = torch.meshgrid(torch.arange(n_grid), torch.arange(n_grid), indexing="ij")
    src, dst = [], []
    for a, b in _OFFSETS:
        ok = (ii + a >= 0) & (ii + a < n_grid) & (jj + b >= 0) & (jj + b < n_grid)
        src.append(ii[ok] * n_grid + jj[ok])
        dst.append((ii[ok] + a) * n_grid + jj[ok] + b)
    src, dst = torch.cat(src), torch.cat(dst)
    with torch.no_grad():
        cost = torch.cat([edge_cost(pts[src[k:k + chunk]], pts[dst[k:k + chunk]]) for k in range(0, len(src), chunk)])
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("graph_path: non-finite edge cost on the latent grid")
    n = len(pts)
    graph = coo_matrix((cost.numpy() + 1e-12, (src.numpy(), dst.numpy())), shape=(n, n)).tocsr()
    s = int((pts - z0).norm(dim=-1).argmin())
    t = int((pts - z1).norm(dim=-1).argmin())
    _, pred = dijkstra(graph, directed=False, indices=s, return_predecessors=True)
    order = [t]
    while order[-1] != s:
        order.append(int(pred[order[-1]]))
    path = pts[order[::-1]]
    return torch.cat([z0[None], path[1:-1], z1[None]])


def resample(curve, n):
    """Points [n, D] equally spaced in arc length along a polyline curve [K, D] (K >= 2)."""
    seg = (curve[1:] - curve[:-1]).norm(dim=-1)
    s = torch.cat([seg.new_zeros(1), seg.cumsum(0)])
    t = torch.linspace(0, float(s[-1]), n, dtype=curve.dtype)
    j = torch.searchsorted(s, t, right=True).clamp(1, len(curve) - 1)
    w = ((t - s[j - 1]) / (s[j] - s[j - 1]).clamp_min(1e-300))[:, None]
    return (1 - w) * curve[j - 1] + w * curve[j]


def geodesic_motion(vae, start, goal, obstacles=None, *, n_nodes=48, n_grid=64, max_iter=300,
                    strength=1e3, margin=0.25, dense=8):
    """Geodesic motion from start to goal [D] under the (obstacle-scaled) pullback metric of vae.

    Latent ends are the encoder means of start and goal; a grid-graph shortest path (graph_path) is
    refined by solvers.path_energy.geodesic_path (n_nodes nodes). Returns a dict: latent [n_nodes, 2],
    motion [dense (n_nodes-1) + 1, D] (decoder mean along the latent polyline, `dense` points per segment),
    latent_line / line_motion (straight line in latent space, decoded), energy, converged, residual.
    """
    from solvers.path_energy import geodesic_path

    dtype = vae.scale.dtype
    start, goal = (torch.as_tensor(p, dtype=dtype) for p in (start, goal))
    metric = motion_metric(vae, obstacles, strength=strength, margin=margin)
    with torch.no_grad():
        z0, z1 = vae.encode(torch.stack([start, goal]))[0]
        pad = 0.5 * (vae.centers.amax(0) - vae.centers.amin(0))
        lo = torch.minimum(vae.centers.amin(0) - pad, torch.minimum(z0, z1) - pad)
        hi = torch.maximum(vae.centers.amax(0) + pad, torch.maximum(z0, z1) + pad)
        init = resample(graph_path(decoder_cost(vae, metric), z0, z1, lo, hi, n_grid), n_nodes)
    res = geodesic_path(metric, z0[None], z1[None], n_nodes=n_nodes, init=init[None], max_iter=max_iter)
    latent = res.path[0].detach()
    t = torch.linspace(0, 1, n_nodes, dtype=dtype)[:, None]
    line = (1 - t) * z0 + t * z1
    with torch.no_grad():
        motion, line_motion = (vae.decoder_mean(resample(p, dense * (n_nodes - 1) + 1)) for p in (latent, line))
    return {"latent": latent, "motion": motion, "latent_line": line, "line_motion": line_motion,
            "init": init, "energy": float(res.energy[0]), "converged": bool(res.converged[0]),
            "residual": float(res.residual[0])}


def dist_to_data(motion, demos, n=200):
    """Mean over n arc-length-equispaced points of the motion [K, D] of the distance to the nearest
    demonstration point (demos [demo, time, D])."""
    pts = torch.as_tensor(demos, dtype=motion.dtype).reshape(-1, motion.shape[-1])
    return float(torch.cdist(resample(motion, n), pts).amin(1).mean())


def clearance(motion, center, radius):
    """min_k |motion_k - center| - radius over a densely sampled motion [K, D] (< 0: it enters the ball)."""
    c = torch.as_tensor(center, dtype=motion.dtype)
    return float((motion - c).norm(dim=-1).min()) - float(radius)




def default_obstacle(start, goal, frac=0.2):
    """A ball on the data-space straight line between start and goal [D]: its midpoint, radius
    frac |goal - start|."""
    start, goal = (torch.as_tensor(p, dtype=torch.float64) for p in (start, goal))
    return (0.5 * (start + goal)).tolist(), frac * float((goal - start).norm())


def run_motion(demos, obstacles=None, *, seed=0, quick=False, n_nodes=48, **fit_opts):
    """Fit the VAE to demos [demo, time, D], make the geodesic motion from the mean start to the mean goal
    and score it against the straight lines in latent and data space. Returns (scores dict, details)."""
    import time

    t0 = time.perf_counter()
    fit_opts.setdefault("steps", 1500 if quick else 2500)
    fit_opts.setdefault("precision_steps", 1000 if quick else 1500)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # tiny networks: extra intra-op threads only spin on shared cores
    try:
        return _run_motion(demos, obstacles, seed, quick, n_nodes, t0, fit_opts)
    finally:
        torch.set_num_threads(threads)


def _run_motion(demos, obstacles, seed, quick, n_nodes, t0, fit_opts):
    import time

    vae = fit_vae(demos, seed=seed, **fit_opts).double()
    start, goal = (torch.as_tensor(demos[:, k].mean(0), dtype=torch.float64) for k in (0, -1))
    out = geodesic_motion(vae, start, goal, obstacles, n_nodes=n_nodes, max_iter=200 if quick else 400)
    line = resample(torch.stack([start, goal]), len(out["motion"]))
    motions = {"geodesic": out["motion"], "linear": line, "latent_linear": out["line_motion"]}
    dist = {k: dist_to_data(m, demos) for k, m in motions.items()}
    clear = {k: min([clearance(m, c, r) for c, r in obstacles or []], default=float("inf"))
             for k, m in motions.items()}
    scores = {
        "geodesic_dist_to_data": dist["geodesic"], "linear_dist_to_data": dist["linear"],
        "latent_linear_dist_to_data": dist["latent_linear"],
        "ratio_vs_linear": dist["geodesic"] / dist["linear"],
        "ratio_vs_latent_linear": dist["geodesic"] / dist["latent_linear"],
        "hits_obstacle": bool(clear["geodesic"] < 0),
        "linear_hits_obstacle": bool(clear["linear"] < 0),
        "latent_linear_hits_obstacle": bool(clear["latent_linear"] < 0),
        "clearance": clear["geodesic"] if obstacles else None,
        "converged": out["converged"], "residual": out["residual"],
        "seconds": time.perf_counter() - t0,
    }
    return scores, {"vae": vae, "motions": motions, "obstacles": obstacles or [], **out}


def plot_motion(demos, details, path, title=""):
    """Save a figure: demonstrations, obstacles and the three motions in data space; log10 magnification
    factor sqrt(det M) of the (obstacle-scaled) metric over the latent plane with the latent paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vae, obstacles = details["vae"], details["obstacles"]
    D = demos.shape[-1]
    fig = plt.figure(figsize=(11, 5))
    ax = fig.add_subplot(1, 2, 1, **({"projection": "3d"} if D == 3 else {}))
    for k, demo in enumerate(demos):
        ax.plot(*demo.T, color="0.6", lw=1, label="demonstrations" if k == 0 else None)
    styles = {"geodesic": ("C3", "-"), "linear": ("C0", ":"), "latent_linear": ("k", "--")}
    for name, m in details["motions"].items():
        ax.plot(*m.numpy().T, color=styles[name][0], ls=styles[name][1], lw=2, label=name.replace("_", " "))
    for c, r in obstacles:
        if D == 2:
            ax.add_patch(plt.Circle(c, r, color="C1", alpha=0.4))
        else:
            u, v = torch.meshgrid(torch.linspace(0, 2 * math.pi, 24), torch.linspace(0, math.pi, 12), indexing="ij")
            ax.plot_surface(c[0] + r * u.cos() * v.sin(), c[1] + r * u.sin() * v.sin(), c[2] + r * v.cos(),
                            color="C1", alpha=0.3)
    if D == 2:
        ax.set_aspect("equal")
    ax.set_title("data space" + (f" ({title})" if title else ""))
    ax.legend(fontsize=8)

    ax = fig.add_subplot(1, 2, 2)
    x = torch.as_tensor(demos, dtype=torch.float64).reshape(-1, D)
    with torch.no_grad():
        z = vae.encode(x)[0]
    pts = torch.cat([z, details["latent"], details["latent_line"]])
    lo, hi = pts.amin(0), pts.amax(0)
    lo, hi = lo - 0.25 * (hi - lo), hi + 0.25 * (hi - lo)
    axes = [torch.linspace(float(lo[k]), float(hi[k]), 120, dtype=torch.float64) for k in range(2)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    metric = motion_metric(vae, obstacles)
    with torch.no_grad():
        mf = torch.cat([magnification_factor(metric, g) for g in grid.split(20)])
    im = ax.pcolormesh(grid[..., 0], grid[..., 1], mf.log10(), shading="auto", cmap="viridis")
    fig.colorbar(im, ax=ax, label="log10 sqrt(det M)")
    ax.scatter(*z.T, s=1, c="w", label="encoded data")
    ax.plot(*details["latent"].T, "-", color="C3", lw=2, label="geodesic")
    ax.plot(*details["latent_line"].T, "--", color="k", lw=1.5, label="latent straight line")
    ax.set_title("latent space: magnification factor")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["MotionVAE", "fit_vae", "motion_metric", "magnification_factor", "midpoint_cost", "decoder_cost",
           "graph_path", "resample",
           "geodesic_motion", "dist_to_data", "clearance", "default_obstacle",
           "run_motion", "plot_motion"]
