"""Graph embedding models and their training loop.

Constant curvature (geoopt manifolds, Riemannian Adam): euclidean, poincare (ball), lorentz
(hyperboloid), sphere, and products such as "product:P5xS5" (factors E/P/L/S with their dims,
distance sqrt(sum of squared factor distances)). Every curved factor has a learnable scale s
(distance s * d_unit, i.e. learnable curvature -+1/s^2 or sphere radius s).

Every model maps pairs [P, 2] (node indices) to distances [P]; `fit` trains it on
the loss mean (d / d_G - 1)^2 (Gu et al.'s default) with a cosine learning-rate schedule.
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
from solvers.metric import NeuralMetric

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
            return ((a - b) ** 2).sum(-1).clamp_min(1e-18).sqrt()
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


def fit(model, pairs, d_graph, *, steps=2000, lr=0.05, batch=None, seed=0, desc="embed", optimizer=None,
        lr_end=0.01):
    """Train model on the ratio loss: full batch, or `batch` random pairs a step. Cosine schedule from lr
    down to lr * lr_end. Full batch: the model ends at its lowest-loss iterate. Returns the per-step
    losses (list of floats)."""
    pairs = torch.as_tensor(pairs, dtype=torch.long)
    d_graph = torch.as_tensor(d_graph, dtype=torch.float64)
    opt = optimizer or geoopt.optim.RiemannianAdam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: lr_end + (1 - lr_end) * 0.5 * (1 + math.cos(math.pi * min(t / steps, 1.0))))
    g = torch.Generator().manual_seed(seed)
    losses, best = [], (math.inf, None)
    full = batch is None or batch >= len(pairs)
    bar = progress(range(steps), desc=desc, leave=False)
    for _ in bar:
        idx = None if full else torch.randint(len(pairs), (batch,), generator=g)
        p, dg = (pairs, d_graph) if idx is None else (pairs[idx], d_graph[idx])
        opt.zero_grad()
        loss = ratio_loss(model(p, idx), dg)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} (learning rate {lr} too large?)")
        if full and loss.item() < best[0]:
            best = (loss.item(), {k: v.detach().clone() for k, v in model.state_dict().items()})
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    if best[1] is not None:
        model.load_state_dict(best[1])
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


class DeepEmbedding(nn.Module):
    """Nodes x [n, d] in R^d under a learned metric A_theta (solvers.metric.NeuralMetric, A = I at
    start); d(x_i, x_j) = sqrt(v^T A(x_i) v) with v = log_{x_i}(x_j) from solvers.geodesic.log_map
    (implicit gradient in x and theta). Each pair's v is warm-started from its last converged solve;
    pairs whose log map did not converge keep their loss value but pass no gradient, and are counted in
    `last_nonconverged`. log_opts go to log_map (steps: RK4 steps of the exp map, max_iter, tol)."""

    def __init__(self, n, dim, init=None, hidden=32, depth=2, seed=0, **log_opts):
        super().__init__()
        torch.manual_seed(seed)
        x = torch.as_tensor(init, dtype=torch.float64) if init is not None else 0.1 * torch.randn(n, dim)
        self.x = nn.Parameter(x.to(torch.float64).clone())
        self.metric = NeuralMetric(dim, hidden=hidden, depth=depth).double()
        self.log_opts = {"steps": 16, "max_iter": 30, "tol": 1e-9, **log_opts}
        self.register_buffer("cache", torch.zeros(n, n, dim, dtype=torch.float64))
        self.register_buffer("valid", torch.zeros(n, n, dtype=torch.bool))
        self.last_nonconverged = 0

    def forward(self, pairs, ids=None):
        """pairs [P, 2] long -> geodesic distances [P]."""
        i, j = pairs[:, 0], pairs[:, 1]
        xi, xj = self.x[i], self.x[j]
        init = torch.where(self.valid[i, j, None], self.cache[i, j], (xj - xi).detach())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bilevel.ConvergenceWarning)
            v, info = log_map(self.metric, xi, xj, init=init, return_info=True, **self.log_opts)
        ok = info.converged
        self.cache[i, j] = torch.where(ok[:, None], v.detach(), self.cache[i, j])
        self.valid[i, j] = ok
        self.last_nonconverged = int((~ok).sum())
        d = torch.einsum("bi,bij,bj->b", v, self.metric(xi), v).clamp_min(1e-30).sqrt()
        return torch.where(ok, d, d.detach())
