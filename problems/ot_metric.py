"""Metric learning from population snapshots by optimal transport (DESIGN.md section 5).

Ground truth G(x) = I - (1 - 1e-3) v v^T, the alignment score on 100 x 100 grids, and two learners:
- fit_scarvelis: Scarvelis & Solomon (ICLR 2023), W1 between consecutive snapshots by the
  Kantorovich-Rubinstein dual with a Lipschitz penalty softplus(-1 + 1/2 grad phi^T R grad phi)
  under a learned R(x) = M(x)^T M(x) + 1e-3 I, alternating potential and metric steps, with the
  Frobenius penalty 1 / |R|_F^2 that keeps R from shrinking. As in the published code, R ends small
  along grad phi (the flow) and large across it; the score reads the cheap direction as e_min(R).
- fit_lagrangian: Pooladian et al. (2023), cost c(x, y) = 1/2 (geodesic length)^2 = min path energy
  under A(x) = I - 0.9 u u^T, u = normalise(MLP(x)); semi-dual E_mu[g^c] + E_nu[g] per pair of
  consecutive snapshots; the c-transform is solved jointly over the end point y and the path's
  interior nodes by batched L-BFGS (solvers.c_transform), warm-started from an amortised map
  T(x) = x + MLP(x), an amortised path network, the previous path and optionally a discrete
  c-transform over the targets (the best start per sample); gradients by the envelope theorem or the
  engine's implicit differentiation.
Snapshots are [K, T, N, d] (problems.ot_data).
"""
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from solvers.c_transform import c_transform
from solvers.metric import bind
from solvers.path_energy import curve_energy

from .ot_data import consecutive_pairs
from .report import progress

EPS_TRUE = 1e-3
GRIDS = {"circle": ((-1.5, 1.5), (-1.5, 1.5)), "x_paths": ((-1.5, 1.5), (-1.5, 1.5)),
         "mass_splitting": ((-2.5, 15.0), (-15.0, 15.0))}


# ----------------------------------------------------------------------------- ground truth, score
def true_direction(name, x):
    """The cheap direction v(x) [..., 2] of a benchmark (not normalised; zero where G = I)."""
    a, b = x[..., 0], x[..., 1]
    if name == "circle":
        return torch.stack([-b, a], -1) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if name == "mass_splitting":
        return torch.stack([torch.ones_like(a), torch.sign(b)], -1) / math.sqrt(2)
    if name == "x_paths":
        p = torch.tanh(F.relu(a * b))
        q = -torch.tanh(F.relu(-a * b))
        return (p[..., None] * torch.tensor([1.0, 1.0], dtype=x.dtype)
                + q[..., None] * torch.tensor([1.0, -1.0], dtype=x.dtype)) / math.sqrt(2)
    raise ValueError(f"no ground-truth metric for {name!r}; choose from {tuple(GRIDS)}")


def true_metric(name):
    """G(x) = I - (1 - 1e-3) v v^T as a metric callable x [..., 2] -> [..., 2, 2]."""
    def metric(x):
        v = true_direction(name, x)
        return torch.eye(2, dtype=x.dtype) - (1 - EPS_TRUE) * v[..., :, None] * v[..., None, :]
    return metric


def grid(name, n=100, dtype=torch.float64):
    """The n x n scoring grid of a benchmark -> [n * n, 2]."""
    if name not in GRIDS:
        raise ValueError(f"no scoring grid for {name!r}; choose from {tuple(GRIDS)}")
    (x0, x1), (y0, y1) = GRIDS[name]
    X, Y = torch.meshgrid(torch.linspace(x0, x1, n, dtype=dtype), torch.linspace(y0, y1, n, dtype=dtype),
                          indexing="xy")
    return torch.stack([X.reshape(-1), Y.reshape(-1)], -1)


def cheap_direction(A):
    """Unit eigenvector of the smallest eigenvalue of symmetric A [..., d, d] -> [..., d]."""
    return torch.linalg.eigh(A)[1][..., 0]


def alignment(name, metric, n=100):
    """l_align = mean over the grid of |<e_min(G_true(x)), e_min(metric(x))>| (1 = perfect)."""
    x = grid(name, n)
    with torch.no_grad():
        A = metric(x)
    if A.shape != (x.shape[0], 2, 2) or not bool(torch.isfinite(A).all()):
        raise ValueError(f"metric must map [n, 2] to finite [n, 2, 2], got {tuple(A.shape)}")
    return float((cheap_direction(true_metric(name)(x)) * cheap_direction(A.to(x.dtype))).sum(-1).abs().mean())


# ----------------------------------------------------------------------------- networks
class BatchedMLP(nn.Module):
    """P independent tanh MLPs in -> hidden -> hidden -> out, evaluated at once on x [P, N, in]."""

    def __init__(self, P, d_in, d_out, hidden=32, zero_last=False):
        super().__init__()
        dims = [d_in, hidden, hidden, d_out]
        self.W = nn.ParameterList()
        self.b = nn.ParameterList()
        for i, (a, c) in enumerate(zip(dims[:-1], dims[1:])):
            w = torch.randn(P, a, c) / math.sqrt(a)
            if zero_last and i == len(dims) - 2:
                w.zero_()
            self.W.append(nn.Parameter(w))
            self.b.append(nn.Parameter(torch.zeros(P, 1, c)))

    def forward(self, x):
        for i, (w, b) in enumerate(zip(self.W, self.b)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.W) - 1:
                x = torch.tanh(x)
        return x


class Normaliser(nn.Module):
    """x -> (x - center) / scale with one isotropic scale (keeps directions); center = the data mean, or the
    origin of the data's own coordinates when centre=False."""

    def __init__(self, snaps, centre=True):
        super().__init__()
        pts = snaps.reshape(-1, snaps.shape[-1])
        self.register_buffer("center", pts.mean(0) if centre else torch.zeros_like(pts[0]))
        self.register_buffer("scale", pts.std(0).mean())

    def forward(self, x):
        return (x - self.center) / self.scale


class Cometric(nn.Module):
    """Scarvelis & Solomon's R(x) = M(x)^T M(x) + 1e-3 I, M from a tanh MLP."""

    def __init__(self, snaps, hidden=32):
        super().__init__()
        d = snaps.shape[-1]
        self.d, self.norm = d, Normaliser(snaps)
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, d * d))

    def forward(self, x):
        M = self.net(self.norm(x)).unflatten(-1, (self.d, self.d))
        return M.transpose(-1, -2) @ M + 1e-3 * torch.eye(self.d, dtype=x.dtype)


class DirectionMetric(nn.Module):
    """Pooladian et al.'s A(x) = I - 0.9 u u^T, u = normalise(MLP(x)): only the orientation is learned.

    init: 'torch' (PyTorch's uniform weights and biases) or 'zero_bias' (LeCun-normal weights, zero biases:
    the published network's initialisation; with leaky ReLU the initial field is then constant along rays
    from the normaliser's center). centre: center the inputs at the data mean (True) or at the origin of
    the data's coordinates (False, as the published network, which reads raw coordinates)."""

    ACTIVATIONS = {"tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}
    INITS = ("torch", "zero_bias")

    def __init__(self, snaps, hidden=64, strength=0.9, activation="tanh", init="torch", centre=True):
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(self.ACTIVATIONS)}, got {activation!r}")
        if init not in self.INITS:
            raise ValueError(f"init must be one of {self.INITS}, got {init!r}")
        d = snaps.shape[-1]
        self.d, self.strength, self.norm = d, strength, Normaliser(snaps, centre)
        act = self.ACTIVATIONS[activation]
        self.net = nn.Sequential(nn.Linear(d, hidden), act(), nn.Linear(hidden, hidden), act(),
                                 nn.Linear(hidden, d))
        if init == "zero_bias":
            for layer in self.net[::2]:
                nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
                nn.init.zeros_(layer.bias)

    def direction(self, x):
        return F.normalize(self.net(self.norm(x)), dim=-1, eps=1e-12)

    def forward(self, x):
        u = self.direction(x)
        return torch.eye(self.d, dtype=x.dtype) - self.strength * u[..., :, None] * u[..., None, :]


def _potential(net, norm, x):
    """Scalar potentials [P, N] of a BatchedMLP on x [P, N, d], in data units (scale^2)."""
    return norm.scale ** 2 * net(norm(x)).squeeze(-1)


@dataclass
class FitResult:
    metric: nn.Module           # score it with alignment(name, metric)
    history: list = field(default_factory=list)   # dicts per logged step
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- Scarvelis & Solomon
def _lipschitz_penalty(grad, R):
    """softplus(-1 + 1/2 g^T R g) per point; grad [..., d], R [..., d, d]."""
    return F.softplus(-1 + 0.5 * torch.einsum("...i,...ij,...j->...", grad, R, grad))


def segment_points(src, dst, n_mix=1):
    """n_mix random points on each segment src[p, i] -> dst[p, i]: [P, N, d] x2 -> [P, n_mix * N, d]."""
    s = torch.rand(n_mix, *src.shape[:2], 1, dtype=src.dtype)
    return (s * src + (1 - s) * dst).transpose(0, 1).flatten(1, 2)


def fit_scarvelis(snaps, *, seed=0, rounds=3, phi_epochs=300, r_epochs=1500, lr=1e-2, phi_weight_decay=5e-2,
                  gp_phi=(1e-2, 1e-3), gp_r=1.0, fro=1e3, n_mix=4, reinit=True, callback=None, log_every=100):
    """Learn R(x) from snapshots [K, T, N, d] by alternating potential and metric steps.

    Each round: (1) potentials phi_p (one per consecutive pair) maximise E_mu[phi] - E_nu[phi] minus
    gp * Lipschitz penalty under the current R (the identity in the first round); (2) with the
    potentials fixed, R minimises fro * mean 1/|R|_F^2 + gp_r * penalty at points on the segments
    between the two snapshots. gp_phi = (first round, later rounds); reinit: start each metric step
    after the first from a fresh R (the published procedure). callback(step, metric) -> dict
    of extra figures to log."""
    torch.manual_seed(seed)
    t0 = time.time()
    src, dst = consecutive_pairs(snaps)
    P, N, d = src.shape
    R = Cometric(snaps).double()
    norm = R.norm
    phi = BatchedMLP(P, d, 1).double()
    opt_phi = torch.optim.AdamW(phi.parameters(), lr=lr, weight_decay=phi_weight_decay)
    opt_r = torch.optim.AdamW(R.net.parameters(), lr=lr, weight_decay=0.0)
    hist, step = [], 0
    bar = progress(total=rounds * (phi_epochs + r_epochs), desc="scarvelis")
    for rnd in range(rounds):
        gp = gp_phi[0] if rnd == 0 else gp_phi[1]
        for _ in range(phi_epochs):
            s = torch.rand(P, N, 1, dtype=src.dtype)
            p = (s * src + (1 - s) * dst).requires_grad_()
            gphi = torch.autograd.grad(_potential(phi, norm, p).sum(), p, create_graph=True)[0]
            Rp = torch.eye(d, dtype=src.dtype) if rnd == 0 else R(p).detach()
            loss = (_potential(phi, norm, dst).mean(1) - _potential(phi, norm, src).mean(1)).sum() \
                + gp * _lipschitz_penalty(gphi, Rp).mean(1).sum()
            opt_phi.zero_grad()
            loss.backward()
            opt_phi.step()
            bar.update()
        if rnd > 0 and reinit:   # as published: each metric step starts from a fresh R
            R = Cometric(snaps).double()
            opt_r = torch.optim.AdamW(R.net.parameters(), lr=lr, weight_decay=0.0)
        p = segment_points(src, dst, n_mix).requires_grad_()   # fixed points and potential gradients
        gphi = torch.autograd.grad(_potential(phi, norm, p).sum(), p)[0].detach()
        p = p.detach()
        for _ in range(r_epochs):
            Rp = R(p)
            loss = fro * (1 / (Rp * Rp).sum((-1, -2))).mean() + gp_r * _lipschitz_penalty(gphi, Rp).mean(1).sum()
            opt_r.zero_grad()
            loss.backward()
            opt_r.step()
            step += 1
            bar.update()
            if callback is not None and (step % log_every == 0):
                hist.append({"round": rnd, "step": step, "loss": float(loss.detach()), **callback(step, R)})
    bar.close()
    return FitResult(R, hist, time.time() - t0)


# ----------------------------------------------------------------------------- Lagrangian cost
def _path_objective(metric, potential, norm, P, n_nodes, box=None, wall=10.0):
    """f(x, z, params) = E(path x -> y) - g_p(y) for the c-transform; z = [y, interior nodes]. box: (lo, hi)
    [2, d] or None; outside it y pays wall / 2 * (distance to the box)^2 (the targets live in the box)."""
    def f(x, z, params):
        B, d = x.shape
        y = z[:, :d]
        path = torch.cat([x[:, None], z[:, d:].reshape(B, n_nodes - 2, d), y[:, None]], 1)
        E = curve_energy(bind(metric, params["metric"]), path)
        g = norm.scale ** 2 * torch.func.functional_call(potential, params["g"], (norm(y).reshape(P, -1, d),))
        if box is not None:
            E = E + 0.5 * wall * (F.relu(box[0] - y) ** 2 + F.relu(y - box[1]) ** 2).sum(-1)
        return E - g.reshape(-1)
    return f


def _straight_interior(x, y, n_nodes):
    t = torch.linspace(0, 1, n_nodes, dtype=x.dtype)[1:-1, None]
    return (x[:, None] + t * (y - x)[:, None]).flatten(1)


class PathNet(nn.Module):
    """Amortised geodesic: the interior nodes of the path x -> y as the straight line plus an MLP offset of
    (x, y) (zero at initialisation), regressed onto the refined paths. x, y [B, d] -> [B, (n_nodes - 2) d]."""

    def __init__(self, norm, d, n_nodes, hidden=64):
        super().__init__()
        self.norm, self.n_nodes = norm, n_nodes
        self.net = nn.Sequential(nn.Linear(2 * d, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, (n_nodes - 2) * d))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, y):
        offset = self.net(torch.cat([self.norm(x), self.norm(y)], -1))
        return _straight_interior(x, y, self.n_nodes) + self.norm.scale * offset


@dataclass
class LagrangianModel:
    """The learned metric, the potentials g_p, amortised maps T_p (one per consecutive pair) and the
    amortised geodesic interior nodes (shared)."""
    metric: DirectionMetric
    potential: BatchedMLP
    tmap: BatchedMLP
    pathnet: PathNet
    n_nodes: int
    box: torch.Tensor = None   # [2, d] (lo, hi) the c-transform keeps its end point in, or None

    def amortised(self, x):
        """T(x) = x + MLP(x) on x [P, n, d]."""
        norm = self.metric.norm
        return x + norm.scale * self.tmap(norm(x))

    def objective(self, P):
        """f(x [B, d], z [B, m], params) -> [B], the c-transform objective E(path) - g_p(y) (B = P n)."""
        return _path_objective(self.metric, self.potential, self.metric.norm, P, self.n_nodes, self.box)

    def params(self):
        """The parameter tree the objective differentiates: {'metric': ..., 'g': ...}."""
        return {"metric": dict(self.metric.named_parameters()), "g": dict(self.potential.named_parameters())}

    def transport(self, x, *, z0=None, max_iter=50, tol=1e-6, backward="envelope", params=None):
        """Solve the c-transform of every x [P, n, d] (from T(x) and the amortised path unless z0 [P n, m]
        is given) -> (CTransformResult, paths [P, n, n_nodes, d])."""
        P, n, d = x.shape
        if z0 is None:
            with torch.no_grad():
                y0 = self.amortised(x).reshape(-1, d)
                z0 = torch.cat([y0, self.pathnet(x.reshape(-1, d), y0)], 1)
        res = c_transform(self.objective(P), x.reshape(-1, d), z0, params or self.params(), max_iter=max_iter,
                          tol=tol, backward=backward)
        z = res.z.detach()
        paths = torch.cat([x.reshape(-1, 1, d), z[:, d:].reshape(-1, self.n_nodes - 2, d), z[:, None, :d]], 1)
        return res, paths.reshape(P, n, self.n_nodes, d)


def _discrete_c_transform(model, x, targets):
    """argmin_j c~(x, y_j) - g(y_j) over the targets [P, M, d] for x [P, n, d] -> [P, n, d], with the cheap cost
    estimate c~ = 1/2 (y - x)^T A((x + y) / 2) (y - x) (one straight segment)."""
    D = targets[:, None] - x[:, :, None]                        # [P, n, M, d]
    A = model.metric(0.5 * (targets[:, None] + x[:, :, None]))
    cost = 0.5 * torch.einsum("pnmi,pnmij,pnmj->pnm", D, A, D)
    j = (cost - _potential(model.potential, model.metric.norm, targets)[:, None]).argmin(-1)
    return torch.gather(targets, 1, j[..., None].expand(-1, -1, x.shape[-1]))


def warm_starts(model, x, targets, previous=None, candidates=("previous", "amortised", "discrete")):
    """Starting points z0 [P, n, m] of the c-transforms of x [P, n, d]: per sample the candidate with the lowest
    objective among 'previous' (the sample's last refined path [P, n, m], NaN where none, its end moved to T(x)),
    'amortised' (T(x) and the amortised path) and 'discrete' (the discrete c-transform over the targets
    [P, M, d] and the amortised path to it)."""
    P, n, d = x.shape
    xf = x.reshape(-1, d)
    with torch.no_grad():
        y0 = model.amortised(x)
        amort = torch.cat([y0, model.pathnet(xf, y0.reshape(-1, d)).reshape(P, n, -1)], -1)
        cands = []
        if "amortised" in candidates:
            cands.append(amort)
        if "previous" in candidates and previous is not None:
            t = torch.linspace(0, 1, model.n_nodes, dtype=x.dtype)[1:-1, None]
            shift = (y0 - previous[..., :d])[..., None, :] * t     # move the old path's end to T(x)
            moved = torch.cat([y0, (previous[..., d:].reshape(P, n, -1, d) + shift).flatten(2)], -1)
            cands.append(torch.where(torch.isnan(previous[..., :1]), amort, moved))
        if "discrete" in candidates:
            yd = _discrete_c_transform(model, x, targets)
            cands.append(torch.cat([yd, model.pathnet(xf, yd.reshape(-1, d)).reshape(P, n, -1)], -1))
        if not cands:
            raise ValueError(f"candidates must name at least one of previous, amortised, discrete, "
                             f"got {candidates}")
        z = torch.stack(cands)                                   # [C, P, n, m]
        C = z.shape[0]
        f = model.objective(P)
        xs = x[None].expand(C, -1, -1, -1).transpose(0, 1).reshape(-1, d)
        vals = f(xs, z.transpose(0, 1).reshape(P * C * n, -1), model.params()).reshape(P, C, n)
        best = vals.argmin(1)                                    # [P, n]
        return torch.gather(z.transpose(0, 1), 1, best[:, None, :, None].expand(-1, 1, -1, z.shape[-1]))[:, 0]


def _semi_dual(model, res, dst):
    """Sum over pairs of E_mu[g^c] + E_nu[g] (the OT cost estimate each potential maximises)."""
    P = dst.shape[0]
    g_nu = _potential(model.potential, model.metric.norm, dst)
    return res.value.reshape(P, -1).mean(1).sum() + g_nu.mean(1).sum()


def gradient_gap(model, src, dst, *, max_iter=100, tol=1e-8):
    """Relative difference between the metric gradients of the semi-dual by the envelope theorem and
    by implicit differentiation of the c-transform, |g_env - g_imp| / |g_env|, at the current model."""
    res, _ = model.transport(src, max_iter=max_iter, tol=tol)
    z0 = res.z.detach()
    grads = []
    for mode in ("envelope", "implicit"):
        params = model.params()
        r, _ = model.transport(src, z0=z0, max_iter=0, tol=tol, backward=mode, params=params)
        J = _semi_dual(model, r, dst)
        gs = torch.autograd.grad(J, list(params["metric"].values()))
        grads.append(torch.cat([g.reshape(-1) for g in gs]))
    return float((grads[0] - grads[1]).norm() / grads[0].norm().clamp_min(1e-300)), float(res.residual.max())


def fit_lagrangian(snaps, *, seed=0, steps=300, batch=32, n_nodes=6, lr_metric=1e-2, lr_g=3e-2, lr_map=1e-2,
                   inner_iter=30, inner_tol=1e-5, backward="envelope", warmup=0,
                   candidates=("previous", "amortised"), box_margin=None, metric_hidden=64,
                   metric_activation="tanh", metric_init="torch", centre=True, callback=None, log_every=50):
    """Learn A(x) = I - 0.9 u u^T from snapshots [K, T, N, d] by the Lagrangian-cost semi-dual.

    Each step draws `batch` source samples per consecutive pair, solves their c-transforms jointly
    with the geodesic paths (n_nodes nodes) by batched L-BFGS from the best of the `candidates` warm
    starts (warm_starts), then takes one ascent step on the potentials, one descent step on the metric
    (gradients by `backward`: 'envelope' or 'implicit'; cosine-decayed learning rate; none in the
    first `warmup` steps, while the potentials are still far from optimal) and one regression step
    of T onto y* and of the path network onto the refined paths. box_margin: keep the end points in the
    snapshots' bounding box widened by box_margin * scale (a quadratic wall), or None for no box.
    metric_hidden, metric_activation: width and nonlinearity ('tanh' or 'leaky_relu', the published
    metric's) of the metric's MLP; metric_init, centre: its initialisation and input origin (DirectionMetric;
    the origin is shared by the potentials and amortised networks). callback(step, metric) -> dict of extra
    figures to log."""
    torch.manual_seed(seed)
    t0 = time.time()
    src, dst = consecutive_pairs(snaps)
    P, N, d = src.shape
    metric = DirectionMetric(snaps, hidden=metric_hidden, activation=metric_activation, init=metric_init,
                             centre=centre).double()
    model = LagrangianModel(metric, BatchedMLP(P, d, 1, zero_last=True).double(),
                            BatchedMLP(P, d, d, zero_last=True).double(), PathNet(metric.norm, d, n_nodes).double(),
                            n_nodes)
    if box_margin is not None:
        pts = snaps.reshape(-1, d)
        m = box_margin * metric.norm.scale
        model.box = torch.stack([pts.min(0).values - m, pts.max(0).values + m])
    opt_m = torch.optim.Adam(model.metric.net.parameters(), lr=lr_metric)
    opt_g = torch.optim.Adam(model.potential.parameters(), lr=lr_g)
    opt_t = torch.optim.Adam([*model.tmap.parameters(), *model.pathnet.parameters()], lr=lr_map)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_m, max(steps - warmup, 1), eta_min=0.05 * lr_metric)
    cache = torch.full((P, N, d * (n_nodes - 1)), float("nan"), dtype=src.dtype)
    hist, unconverged = [], 0
    batch = min(batch, N)
    scale2 = model.metric.norm.scale ** 2
    for step in progress(range(1, steps + 1), desc="lagrangian"):
        idx = torch.stack([torch.randperm(N)[:batch] for _ in range(P)])
        x = torch.gather(src, 1, idx[..., None].expand(-1, -1, d))
        old = torch.gather(cache, 1, idx[..., None].expand(-1, -1, cache.shape[-1]))
        z0 = warm_starts(model, x, dst, old, candidates).reshape(P * batch, -1)
        res, _ = model.transport(x, z0=z0, max_iter=inner_iter, tol=inner_tol, backward=backward)
        unconverged += int((~res.converged).sum())
        J = _semi_dual(model, res, dst)
        opt_m.zero_grad()
        opt_g.zero_grad()
        J.backward()
        for p in model.potential.parameters():   # the potentials maximise the semi-dual
            p.grad.neg_()
        if step > warmup:   # the metric moves only once the potentials fit the data
            opt_m.step()
            sched.step()
        opt_g.step()
        zs = res.z.detach().reshape(P, batch, -1)
        cache.scatter_(1, idx[..., None].expand(-1, -1, cache.shape[-1]), zs)
        loss_t = ((model.amortised(x) - zs[..., :d]) ** 2).sum(-1).mean() / scale2
        pred = model.pathnet(x.reshape(-1, d), zs[..., :d].reshape(-1, d))
        loss_path = ((pred - zs[..., d:].reshape(P * batch, -1)) ** 2).sum(-1).mean() / scale2
        opt_t.zero_grad()
        (loss_t + loss_path).backward()
        opt_t.step()
        if callback is not None and step % log_every == 0:
            hist.append({"step": step, "semi_dual": float(J.detach()), "map_loss": float(loss_t.detach()),
                         "path_loss": float(loss_path.detach()), "inner_residual": float(res.residual.max()),
                         **callback(step, model.metric)})
    extra = {"unconverged_inner_fraction": unconverged / max(steps * P * batch, 1)}
    return FitResult(model.metric, hist, time.time() - t0, {"model": model, **extra})
