"""Graph embedding models and their training loop.

Constant curvature (geoopt manifolds, Riemannian Adam): euclidean, poincare (ball), lorentz
(hyperboloid), sphere, and products such as "product:P5xS5" (factors E/P/L/S with their dims,
distance sqrt(sum of squared factor distances)). Every curved factor has a learnable scale s
(distance s * d_unit, i.e. learnable curvature -+1/s^2 or sphere radius s).

Every model maps pairs [P, 2] (node indices) to distances [P]; `fit` trains it on a loss of LOSSES
with a cosine learning-rate schedule: "ratio", mean (d / d_G - 1)^2 (Gu et al.'s default), or "wc",
a smooth log worst-case distortion (smooth_log_wc) plus a small multiple of the ratio loss.
"""
import math
import re
import warnings

import geoopt
import numpy as np
import torch
from torch import nn

import bilevel
from solvers.geodesic import log_map
from solvers.metric import NeuralMetric, poincare_distance, sphere_distance

from .report import progress

KINDS = {"E": "euclidean", "P": "poincare", "L": "lorentz", "H": "lorentz", "S": "sphere"}
MANIFOLDS = ("euclidean", "poincare", "lorentz", "sphere")


def parse_manifold(manifold, dim=None):
    """Factors [(kind, dim)] of a manifold name ("poincare" with dim) or "product:P5xS5" (dim: None
    or the sum of the factor dims)."""
    if manifold in MANIFOLDS:
        if not dim or dim < 1:
            raise ValueError(f"manifold {manifold!r} needs a dimension >= 1, got {dim}")
        return [(manifold, int(dim))]
    if manifold.startswith("product:"):
        parts = re.split(r"[x,]", manifold[len("product:"):])
        factors = []
        for p in parts:
            m = re.fullmatch(r"([EPLHS])(\d+)", p.strip())
            if not m or int(m.group(2)) < 1:
                raise ValueError(f"bad product factor {p!r} in {manifold!r}: use a letter E (euclidean), "
                                 "P (Poincare ball), L or H (Lorentz), S (sphere) and a dimension, e.g. "
                                 "product:P5xS5")
            factors.append((KINDS[m.group(1)], int(m.group(2))))
        total = sum(d for _, d in factors)
        if dim and dim != total:
            raise ValueError(f"{manifold!r} has total dimension {total}, but dim={dim} was asked")
        return factors
    raise ValueError(f"unknown manifold {manifold!r}: choose from {[*MANIFOLDS, 'product:SPEC', 'deep']}")


def classical_mds(d_graph, dim):
    """Classical multidimensional scaling of a full distance matrix [n, n] -> coordinates [n, dim]."""
    d = np.asarray(d_graph, dtype=np.float64)
    n = d.shape[0]
    j = np.eye(n) - 1.0 / n
    w, v = np.linalg.eigh(-0.5 * j @ (d ** 2) @ j)
    w, v = w[::-1][:dim], v[:, ::-1][:, :dim]
    x = v * np.sqrt(np.clip(w, 0, None))
    return np.pad(x, ((0, 0), (0, dim - x.shape[1])))


def euclidean_distance(x, y):
    """|x - y| for x, y [..., d] -> [...], with a finite gradient at x = y."""
    return ((x - y) ** 2).sum(-1).clamp_min(1e-18).sqrt()


class ConstantCurvature(nn.Module):
    """Nodes on a product of constant-curvature factors, initialised from classical MDS of d_graph
    [n, n] (None: near the origin): flat and hyperbolic factors at exp_origin(u / s0), s0 = max|u| / 2;
    sphere factors S^d at the MDS coordinates in R^(d+1) normalised, with the scale that matches the
    mean graph distance. Every factor gets small seeded noise (so product factors differ)."""

    def __init__(self, n, factors, d_graph=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.factors = factors
        self.points = nn.ParameterList()
        self.log_scales = nn.ParameterList()
        self.manifolds = []
        for kind, d in factors:
            ambient = d + (kind in ("sphere", "lorentz"))
            u = torch.zeros(n, ambient if kind == "sphere" else d, dtype=torch.float64)
            if d_graph is not None:
                u = torch.as_tensor(classical_mds(d_graph, u.shape[1]))
            u = u + 1e-2 * torch.randn(u.shape, generator=g, dtype=torch.float64) * u.abs().max().clamp_min(1)
            s0 = max(float(u.norm(dim=-1).max()) / 2, 1e-3)
            if kind == "euclidean":
                man, x, s0 = geoopt.Euclidean(ndim=1), u, 1.0
            elif kind == "poincare":
                man = geoopt.PoincareBall()
                x = man.expmap0(u / s0)
            elif kind == "lorentz":
                man = geoopt.Lorentz()
                x = man.expmap0(torch.cat([torch.zeros(n, 1, dtype=u.dtype), u / s0], -1))
            else:
                man = geoopt.Sphere()
                x = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                if d_graph is not None:
                    i, j = np.triu_indices(n, 1)
                    ang = torch.acos((x[i] * x[j]).sum(-1).clamp(-1, 1)).mean()
                    s0 = float(np.mean(np.asarray(d_graph)[i, j]) / ang.clamp_min(1e-6))
            self.manifolds.append(man)
            self.points.append(geoopt.ManifoldParameter(x, manifold=man))
            self.log_scales.append(nn.Parameter(torch.tensor(math.log(s0), dtype=torch.float64),
                                                requires_grad=kind != "euclidean"))

    def factor_distance(self, k, pairs):
        kind, man, x = self.factors[k][0], self.manifolds[k], self.points[k]
        a, b = x[pairs[:, 0]], x[pairs[:, 1]]
        if kind == "euclidean":
            return euclidean_distance(a, b)
        if kind == "sphere":
            d = torch.acos((a * b).sum(-1).clamp(-1 + 1e-7, 1 - 1e-7))
        else:
            d = man.dist(a, b)
        return self.log_scales[k].exp() * d

    def forward(self, pairs, ids=None):
        """pairs [P, 2] long -> distances [P]."""
        if len(self.factors) == 1:
            return self.factor_distance(0, pairs)
        sq = sum(self.factor_distance(k, pairs) ** 2 for k in range(len(self.factors)))
        return sq.clamp_min(1e-18).sqrt()


def ratio_loss(d, d_graph):
    """mean over pairs (d / d_G - 1)^2."""
    return ((d / d_graph - 1) ** 2).mean()


def smooth_log_wc(d, d_graph, tau):
    """Smooth log D_wc: tau * logsumexp(log r / tau) + tau * logsumexp(-log r / tau) over the pairs,
    r = d / d_G. Each term is a soft maximum, so log D_wc <= smooth_log_wc <= log D_wc + 2 tau log P
    (P pairs), and it tends to log D_wc = log max r + log max 1/r as tau -> 0."""
    if tau <= 0:
        raise ValueError(f"smooth_log_wc needs tau > 0, got {tau}")
    log_r = torch.log(d) - torch.log(d_graph)
    return tau * (torch.logsumexp(log_r / tau, 0) + torch.logsumexp(-log_r / tau, 0))


WC_TAU = 0.003
WC_RATIO_WEIGHT = 0.1


def wc_loss(d, d_graph):
    """smooth_log_wc(tau = WC_TAU) + WC_RATIO_WEIGHT * ratio_loss: the worst pairs set the first term;
    the second gives every other pair a signal (and fixes the scale, to which D_wc is blind)."""
    return smooth_log_wc(d, d_graph, WC_TAU) + WC_RATIO_WEIGHT * ratio_loss(d, d_graph)


WC_SHARP_TAU = 5e-4


def sharp_wc_loss(d, d_graph):
    """smooth_log_wc at WC_SHARP_TAU, no ratio term: within 2 WC_SHARP_TAU log P of log D_wc, for the last
    stage of a fit that is already near a wc optimum (the tau of wc_loss leaves D_wc 0.5-0.8% higher)."""
    return smooth_log_wc(d, d_graph, WC_SHARP_TAU)


def log_d_wc(d, d_graph):
    """log D_wc = log max r + log max 1/r, r = d / d_G (the objective the wc losses smooth)."""
    log_r = torch.log(d) - torch.log(d_graph)
    return log_r.max() - log_r.min()


LOSSES = {"ratio": ratio_loss, "wc": wc_loss, "wc_sharp": sharp_wc_loss}
SELECT = {"ratio": ratio_loss, "wc": log_d_wc, "wc_sharp": log_d_wc}  # what picks fit's kept iterate


def get_loss(name):
    """The loss function (d, d_G) -> scalar named by name (a key of LOSSES)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose from {list(LOSSES)}")
    return LOSSES[name]


def fit(model, pairs, d_graph, *, steps=2000, lr=0.05, batch=None, seed=0, desc="embed", optimizer=None,
        lr_end=0.01, eval_every=None, eval_chunk=200_000, checks=None, loss="ratio", hard=0):
    """Train model on the loss named by loss (LOSSES): full batch, or `batch` random pairs a step.
    Cosine schedule from lr down to lr * lr_end. The model ends at its best iterate by the loss's
    objective (SELECT: the ratio loss itself; log D_wc exactly for the wc losses, whose smooth soft
    maximum can fall while the true one rises): full batch, at each step; sampled batches, on all `pairs`
    (no grad, distances in chunks of eval_chunk pairs) before the first step, every eval_every steps
    (default steps // 20) and after the last. An iterate with a non-converged distance
    (model.last_nonconverged > 0, e.g. a Deep log map) is never kept; if no iterate qualifies, the model
    goes back to its start (with a bilevel.ConvergenceWarning). A non-finite loss ends the training at
    the best iterate so far (a RuntimeWarning), or raises FloatingPointError when there is none. After
    each step a model with a `project` method is projected onto its feasible set.
    checks: an optional list that gets (step, full-pair loss, objective) of each such evaluation.
    Returns the per-step (batch) losses (list of floats). With sampled batches the "wc" loss of a
    batch is a biased (low) estimate of the full-pair one; hard > 0 puts in every batch the hard // 2
    most stretched and hard - hard // 2 most contracted pairs (d / d_G) of the last full-pair
    evaluation, the rest drawn at random."""
    loss_fn, select = get_loss(loss), SELECT[loss]
    pairs = torch.as_tensor(pairs, dtype=torch.long)
    d_graph = torch.as_tensor(d_graph, dtype=torch.float64)
    opt = optimizer or geoopt.optim.RiemannianAdam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: lr_end + (1 - lr_end) * 0.5 * (1 + math.cos(math.pi * min(t / steps, 1.0))))
    g = torch.Generator().manual_seed(seed)
    losses, best = [], (math.inf, None)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full = batch is None or batch >= len(pairs)
    eval_every = None if full else max(1, eval_every or steps // 20)
    checks = [] if checks is None else checks
    worst = torch.zeros(0, dtype=torch.long)
    if hard and not full and not 0 < hard < batch:
        raise ValueError(f"hard pairs a batch must be in [0, batch = {batch}), got {hard}")

    def keep(score, nonconverged):
        nonlocal best
        if nonconverged == 0 and score < best[0]:
            best = (score, {k: v.detach().clone() for k, v in model.state_dict().items()})

    def diverged(value, step):
        """True (after a warning) when a non-finite loss ends the training at the best iterate so far."""
        if math.isfinite(value):
            return False
        if best[1] is None:
            raise FloatingPointError(f"{desc}: loss became {value} at step {step} (learning rate {lr} too large?)")
        warnings.warn(f"{desc}: loss became {value} at step {step}; stopping at the best iterate so far",
                      RuntimeWarning, stacklevel=3)
        return True

    def check(step):
        nonlocal worst
        d, bad = all_distances(model, pairs, chunk=eval_chunk)
        d = torch.as_tensor(d)
        value = float(loss_fn(d, d_graph))
        if diverged(value, step):
            return True
        checks.append((step, value, float(select(d, d_graph))))
        if hard:
            order = torch.argsort(torch.log(d) - torch.log(d_graph))
            worst = torch.cat([order[len(order) - hard // 2:], order[:hard - hard // 2]])
        keep(checks[-1][2], bad)
        return False

    bar = progress(range(steps), desc=desc, leave=False)
    for t in bar:
        if not full and t % eval_every == 0 and check(t):
            break
        idx = None if full else torch.cat([worst, torch.randint(len(pairs), (batch - len(worst),), generator=g)])
        p, dg = (pairs, d_graph) if idx is None else (pairs[idx], d_graph[idx])
        opt.zero_grad()
        d = model(p, idx)
        loss = loss_fn(d, dg)
        if diverged(loss.item(), t):
            break
        if full:
            keep(float(select(d.detach(), dg)), getattr(model, "last_nonconverged", 0))
        loss.backward()
        opt.step()
        if hasattr(model, "project"):
            model.project()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    else:
        if not full:
            check(steps)
    if best[1] is None:
        warnings.warn(f"{desc}: every iterate had non-converged distances; the model is back at its start",
                      bilevel.ConvergenceWarning, stacklevel=2)
    model.load_state_dict(start if best[1] is None else best[1])
    return losses


@torch.no_grad()
def all_distances(model, pairs, chunk=200_000):
    """Distances of pairs [P, 2] in chunks -> (numpy [P], number of pairs whose solver did not converge)."""
    pairs = torch.as_tensor(pairs, dtype=torch.long)
    out, bad = [], 0
    for s in range(0, len(pairs), chunk):
        out.append(model(pairs[s:s + chunk]))
        bad += getattr(model, "last_nonconverged", 0)
    return torch.cat(out).double().numpy(), bad


CHART_K = {"poincare": -1.0, "sphere": 1.0}  # geoopt Stereographic curvature of each conformal chart


def chart_points(z, conformal):
    """Node parameters z [n, d] -> chart coordinates x [n, d]: x = z (euclidean), or the point at
    geodesic distance |z| from the origin along z in the unit ball (poincare, |x| = tanh(|z|/2)) or
    the stereographic plane (sphere, |x| = tan(|z|/2), |z| < pi). Adam steps in z are then steps of
    about their size in unit-curvature distance, also near the ball's boundary."""
    if conformal == "euclidean":
        return z
    r = z.norm(dim=-1, keepdim=True)
    small = r < 1e-6
    rs = torch.where(small, torch.ones_like(r), r)
    f = torch.tanh(rs / 2) if conformal == "poincare" else torch.tan(rs.clamp(max=math.pi - 1e-6) / 2)
    return torch.where(small, 0.5 * z, z * (f / rs))


def chart_params(x, conformal):
    """Inverse of chart_points: chart coordinates x [n, d] -> node parameters z [n, d]."""
    if conformal == "euclidean":
        return x
    r = x.norm(dim=-1, keepdim=True)
    small = r < 1e-9
    rs = torch.where(small, torch.ones_like(r), r)
    g = 2 * (torch.atanh(rs) if conformal == "poincare" else torch.atan(rs))
    return torch.where(small, 2 * x, x * (g / rs))


def sphere_angles(z):
    """Node parameters z [n, d] of the sphere chart (|z| = angle from the chart's origin point, see
    chart_points) -> pairwise angles [n, n] on the unit sphere S^d."""
    r = z.norm(dim=-1, keepdim=True)
    u = z / r.clamp_min(1e-12)
    y = torch.cat([torch.cos(r), torch.sin(r) * u], dim=-1)
    return torch.arccos((y @ y.T).clamp(-1.0, 1.0))


def pull_from_cut_locus(z, max_angle=0.99 * math.pi,
                        shrink=(0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4)):
    """Sphere chart parameters z [n, d] -> ((1 - delta) z, delta): every node's angle from the chart's
    origin shrunk by the first delta in shrink (0 if none is needed) that leaves no two nodes more than
    max_angle apart. Antipodal nodes are conjugate points, where the shooting Jacobian is singular;
    near-antipodal ones are reachable along the geodesic through the origin. Raises ValueError when
    no delta in shrink suffices."""
    for delta in (0.0, *shrink):
        zc = (1 - delta) * z
        if float(sphere_angles(zc).max()) <= max_angle:
            return zc, delta
    raise ValueError(f"the sphere fit's nodes stay more than {max_angle:.3f} rad apart after shrinking "
                     f"their angles by {shrink[-1]}")


def stereographic_pole(y, n_candidates=4000, seed=0):
    """A unit vector of R^(d+1) far from every point of y [n, d+1] on the unit sphere (the largest
    smallest angle among the antipodes of the points and seeded random directions)."""
    g = torch.Generator().manual_seed(seed)
    cand = torch.cat([-y, torch.randn(n_candidates, y.shape[1], generator=g, dtype=y.dtype)])
    cand = cand / cand.norm(dim=1, keepdim=True)
    return cand[(cand @ y.T).amax(1).argmin()]


def to_conformal_chart(model):
    """A fitted single-factor ConstantCurvature model (or a ChartEmbedding) -> (conformal base, chart
    coordinates x [n, d], scale): Euclidean as is; Poincare ball as is; Lorentz mapped to the ball by the isometry
    x = x_s / (1 + x_0); sphere S^d by stereographic projection from a pole far from every node
    (so that the chart's unit sphere metric is (2 / (1 + |x|^2))^2 I). Distances are unchanged:
    d = scale * (unit-curvature distance of the chart)."""
    if isinstance(model, ChartEmbedding):
        return model.conformal, model.x.detach().clone(), model.scale
    if len(model.factors) != 1:
        raise ValueError(f"Deep initialises from one constant-curvature factor, got {model.factors}")
    kind = model.factors[0][0]
    p = model.points[0].detach()
    scale = float(model.log_scales[0].detach().exp())
    if kind == "euclidean":
        return "euclidean", p.clone(), 1.0
    if kind == "poincare":
        return "poincare", p.clone(), scale
    if kind == "lorentz":
        return "poincare", p[:, 1:] / (1 + p[:, :1]), scale
    y = p / p.norm(dim=1, keepdim=True)
    pole = stereographic_pole(y)
    # orthonormal basis of pole^perp: the last d columns of a QR of [pole, I]
    q, _ = torch.linalg.qr(torch.cat([pole[:, None], torch.eye(len(pole), dtype=p.dtype)], 1))
    basis = q[:, 1:]
    return "sphere", (y @ basis) / (1 - y @ pole)[:, None], scale


CHART_DISTANCE = {"euclidean": euclidean_distance,
                  "poincare": poincare_distance, "sphere": sphere_distance}


class ChartEmbedding(nn.Module):
    """A constant-curvature embedding in a conformal chart (the arguments are to_conformal_chart's
    output: base name, chart coordinates x [n, d], scale): node parameters z [n, d]
    (chart_points(z) = x), distances scale * the chart's closed-form unit-curvature distance. Deep's base
    with exact distances, and unconstrained parameters (for polish_wc)."""

    def __init__(self, conformal, x, scale):
        super().__init__()
        self.conformal, self.scale = conformal, float(scale)
        self.z = nn.Parameter(chart_params(torch.as_tensor(x, dtype=torch.float64), conformal).clone())

    @property
    def x(self):
        return chart_points(self.z, self.conformal)

    def forward(self, pairs, ids=None):
        """pairs [P, 2] long -> distances [P]."""
        x = self.x
        return self.scale * CHART_DISTANCE[self.conformal](x[pairs[:, 0]], x[pairs[:, 1]])

    @torch.no_grad()
    def fit_scale(self, pairs, d_graph):
        """Set scale to the one with the lowest D_avg = mean |c r - 1| over pairs [P, 2] (r = d / d_G): c is
        the median of 1 / r weighted by r. D_wc is blind to scale, so an exact-D_wc polish lets it drift."""
        r = (self(torch.as_tensor(pairs)) / torch.as_tensor(d_graph, dtype=torch.float64)).numpy()
        order = np.argsort(1 / r)
        cum = np.cumsum(r[order])
        self.scale *= float((1 / r)[order][np.searchsorted(cum, cum[-1] / 2)])


class DeepEmbedding(nn.Module):
    """Nodes x [n, d] in R^d under a learned metric A_theta (solvers.metric.NeuralMetric; with
    `conformal` its correction of a constant-curvature base metric s^2 c(x) I, the correction I at
    start); d(x_i, x_j) = sqrt(v^T A(x_i) v) with v = log_{x_i}(x_j) from solvers.geodesic.log_map
    (implicit gradient in x and theta). The trained node parameters are z (chart_points(z) = x).
    A pair's first log-map start is the base metric's closed-form log map (geoopt Stereographic,
    y - x when flat), later ones its last converged v; pairs whose log map did not converge keep
    their loss value but pass no gradient, and are counted in `last_nonconverged`. log_opts go to
    log_map (steps: RK4 steps of the exp map, max_iter, tol)."""

    def __init__(self, n, dim, init=None, hidden=32, depth=2, seed=0, conformal="euclidean", scale=1.0,
                 **log_opts):
        super().__init__()
        torch.manual_seed(seed)
        x = torch.as_tensor(init, dtype=torch.float64) if init is not None else 0.1 * torch.randn(n, dim)
        if conformal == "poincare" and not bool((x.norm(dim=1) < 1).all()):
            raise ValueError("DeepEmbedding with the Poincare base needs every node inside the unit ball")
        self.conformal = conformal
        self.z = nn.Parameter(chart_params(x.to(torch.float64), conformal).clone())
        self.metric = NeuralMetric(dim, hidden=hidden, depth=depth, conformal=conformal, scale=scale).double()
        self.log_opts = {"steps": 16, "max_iter": 30, "tol": 1e-9, **log_opts}
        self.register_buffer("cache", torch.zeros(n, n, dim, dtype=torch.float64))
        self.register_buffer("valid", torch.zeros(n, n, dtype=torch.bool))
        self.last_nonconverged = 0

    @property
    def x(self):
        """Node coordinates [n, d] in the metric's chart."""
        return chart_points(self.z, self.conformal)

    @torch.no_grad()
    def project(self):
        """On the sphere base, keep nodes off the cut locus (pull_from_cut_locus) after each step."""
        if self.conformal == "sphere":
            self.z.copy_(pull_from_cut_locus(self.z)[0])

    def base_log(self, x, y):
        """Closed-form log map of the base metric (the learned metric at initialisation)."""
        if self.conformal == "euclidean":
            return y - x
        return geoopt.Stereographic(k=CHART_K[self.conformal]).logmap(x, y)

    def forward(self, pairs, ids=None):
        """pairs [P, 2] long -> geodesic distances [P]."""
        i, j = pairs[:, 0], pairs[:, 1]
        x = self.x
        xi, xj = x[i], x[j]
        with torch.no_grad():
            init = torch.where(self.valid[i, j, None], self.cache[i, j], self.base_log(xi, xj))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bilevel.ConvergenceWarning)
            v, info = log_map(self.metric, xi, xj, init=init, return_info=True, **self.log_opts)
        ok = info.converged
        self.cache[i, j] = torch.where(ok[:, None], v.detach(), self.cache[i, j])
        self.valid[i, j] = ok
        self.last_nonconverged = int((~ok).sum())
        d = torch.einsum("bi,bij,bj->b", v, self.metric(xi), v).clamp_min(1e-30).sqrt()
        return torch.where(ok, d, d.detach())
