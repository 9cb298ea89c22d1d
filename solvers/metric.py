"""Riemannian metric fields on R^d: x [..., d] -> A(x) [..., d, d], symmetric positive definite.

A metric is any callable; learned metrics are torch.nn.Module instances whose parameters are
what gets trained. Closed forms (Euclidean, Poincare ball, sphere by inverse stereographic
projection) come with their exact distances for validation.
"""
import math

import torch
from torch import nn


CONFORMAL = ("euclidean", "poincare", "sphere")


class NeuralMetric(nn.Module):
    """A(x) = s^2 c(x) (L(x) L(x)^T + eps I) with L(x) [d, d] from a smooth (tanh) MLP; SPD by construction.

    conformal: the base c(x) = 1 ('euclidean'), (2 / (1 - |x|^2))^2 ('poincare', |x| < 1) or
    (2 / (1 + |x|^2))^2 ('sphere', inverse stereographic), with a fixed scale s (distances are
    s times the base's); the MLP then learns an SPD correction of a constant-curvature metric.
    init_identity: the last layer starts at zero and L has the constant part sqrt(1 - eps) I, so
    the correction is I at initialisation (A = s^2 c(x) I).
    `geodesic_rhs` is the geodesic ODE's right-hand side in closed form (used by
    solvers.geodesic.geodesic_acceleration in place of its generic JVP/VJP form)."""

    def __init__(self, dim, hidden=64, depth=2, eps=1e-3, init_identity=True, conformal="euclidean", scale=1.0):
        super().__init__()
        if dim < 1 or depth < 1 or not 0 < eps < 1:
            raise ValueError(f"NeuralMetric needs dim >= 1, depth >= 1, 0 < eps < 1; got {dim}, {depth}, {eps}")
        if conformal not in CONFORMAL or not scale > 0:
            raise ValueError(f"NeuralMetric conformal must be one of {CONFORMAL} and scale > 0; got "
                             f"{conformal!r}, {scale}")
        self.dim, self.eps, self.depth, self.conformal = dim, eps, depth, conformal
        layers, width = [], dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        self.out = nn.Linear(width, dim * dim)
        self.body = nn.Sequential(*layers)
        if init_identity:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.register_buffer("base", math.sqrt(1 - eps) * torch.eye(dim))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def _check(self, x):
        if x.shape[-1] != self.dim:
            raise ValueError(f"NeuralMetric of dim {self.dim} got points of shape {tuple(x.shape)}")

    def _log_factor_grad(self, x):
        """(s^2 c(x), grad log c(x)) at x [..., d] -> ([...], [..., d]) (None for the flat base)."""
        sq = (x * x).sum(-1, keepdim=True)
        if self.conformal == "euclidean":
            return self.scale.to(x.dtype) ** 2 * torch.ones_like(sq[..., 0]), None
        den = 1 - sq if self.conformal == "poincare" else 1 + sq
        c = self.scale.to(x.dtype) ** 2 * (2 / den[..., 0]) ** 2
        return c, (4 if self.conformal == "poincare" else -4) * x / den

    def forward(self, x):
        """x [..., d] -> A [..., d, d]."""
        self._check(x)
        L = self.base.to(x.dtype) + self.out(self.body(x)).unflatten(-1, (self.dim, self.dim))
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        c, _ = self._log_factor_grad(x)
        return c[..., None, None] * (L @ L.transpose(-1, -2) + self.eps * eye)

    def geodesic_rhs(self, x, v, params=None):
        """x'' of the geodesic ODE at x [B, d] with velocity v [B, d] -> [B, d], in one pass.

        With M = L L^T + eps I, q = v^T M v = |L^T v|^2 + eps |v|^2 and g = grad log c:
            x'' = M^{-1} (1/2 grad_x q - (dM/dt) v + 1/2 q g) - (g . v) v,
        (dM/dt) v = dL (L^T v) + L (dL^T v) with dL the forward tangent of the MLP along v, and
        grad_x q by a hand-written backward pass through the MLP. Plain torch ops: differentiable
        by autograd and torch.func (forward mode). params: the parameters to use (name -> tensor,
        as from named_parameters(); default the module's own)."""
        self._check(x)
        p = dict(self.named_parameters()) if params is None else params
        d = self.dim
        h, dh, slopes = x, v, []
        for k in range(self.depth):
            W, b = p[f"body.{2 * k}.weight"], p[f"body.{2 * k}.bias"]
            h = torch.tanh(torch.addmm(b, h, W.T))
            s = 1 - h * h
            dh = s * (dh @ W.T)
            slopes.append((W, s))
        Wo = p["out.weight"]
        L = self.base.to(x.dtype) + torch.addmm(p["out.bias"], h, Wo.T).unflatten(-1, (d, d))
        dL = (dh @ Wo.T).unflatten(-1, (d, d))
        w = (v[:, None, :] @ L)[:, 0]  # L^T v
        dMv = (dL @ w[..., None])[..., 0] + (L @ (v[:, None, :] @ dL).transpose(-1, -2))[..., 0]
        g = (v[:, :, None] * w[:, None, :]).flatten(1) @ Wo  # 1/2 dq/dh at the last hidden layer
        for W, s in reversed(slopes):
            g = (g * s) @ W
        rhs = g - dMv
        _, glog = self._log_factor_grad(x)
        if glog is not None:
            rhs = rhs + 0.5 * ((w * w).sum(-1, keepdim=True) + self.eps * (v * v).sum(-1, keepdim=True)) * glog
        M = L @ L.transpose(-1, -2) + self.eps * torch.eye(d, dtype=x.dtype, device=x.device)
        a = torch.linalg.solve(M, rhs)
        if glog is not None:
            a = a - (glog * v).sum(-1, keepdim=True) * v
        return a


def _conformal(x, factor):
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return factor[..., None, None] * eye


def euclidean(x):
    """A(x) = I."""
    return _conformal(x, torch.ones_like(x[..., 0]))


def poincare(x):
    """Poincare ball of curvature -1: A(x) = (2 / (1 - |x|^2))^2 I, for |x| < 1."""
    return _conformal(x, (2 / (1 - (x * x).sum(-1))) ** 2)


def sphere(x):
    """Unit sphere in inverse stereographic coordinates: A(x) = (2 / (1 + |x|^2))^2 I."""
    return _conformal(x, (2 / (1 + (x * x).sum(-1))) ** 2)


def poincare_distance(x, y):
    """arccosh(1 + 2|x - y|^2 / ((1 - |x|^2)(1 - |y|^2))), x, y [..., d] -> [...]."""
    sq = ((x - y) ** 2).sum(-1)
    den = (1 - (x * x).sum(-1)) * (1 - (y * y).sum(-1))
    # arccosh(1 + z) = 2 asinh(sqrt(z / 2)): accurate for small z
    return 2 * torch.asinh(torch.sqrt(sq / den))


def sphere_distance(x, y):
    """Great-circle distance between the sphere points of x, y [..., d] (stereographic) -> [...]."""
    sq = ((x - y) ** 2).sum(-1)
    den = (1 + (x * x).sum(-1)) * (1 + (y * y).sum(-1))
    # chord^2 = 4 |x - y|^2 / den; angle = 2 asin(chord / 2)
    return 2 * torch.asin(torch.clamp(torch.sqrt(sq / den), max=1.0))


def check_spd(A, where="metric"):
    """Raise ValueError naming the first bad point if A [..., d, d] is not finite symmetric positive definite."""
    flat = A.reshape(-1, *A.shape[-2:])
    bad = ~torch.isfinite(flat).flatten(1).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{where} is NaN or inf at point {i} (of {flat.shape[0]})")
    asym = (flat - flat.transpose(-1, -2)).abs().amax((-1, -2))
    scale = flat.abs().amax((-1, -2)).clamp_min(torch.finfo(A.dtype).tiny)
    bad = asym > 1e3 * torch.finfo(A.dtype).eps * scale
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{where} is not symmetric at point {i} (|A - A^T| = {float(asym[i]):.3g})")
    _, info = torch.linalg.cholesky_ex(flat.detach())
    bad = info != 0
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        lam = float(torch.linalg.eigvalsh(flat[i].detach())[0])
        raise ValueError(f"{where} is not positive definite at point {i} (smallest eigenvalue {lam:.3g})")
    return A


def check_pairs(x, y, names=("x", "y")):
    """Raise ValueError unless x and y are finite floating [B, d] tensors of the same shape and dtype."""
    for t, n in zip((x, y), names):
        if not torch.is_tensor(t) or not t.is_floating_point() or t.dim() != 2:
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{n} must be a floating-point tensor [B, d], got {shape}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{n} contains NaN or inf")
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(f"{names[0]} and {names[1]} must match: {tuple(x.shape)} {x.dtype} vs "
                         f"{tuple(y.shape)} {y.dtype}")


def metric_params(metric):
    """The metric's trainable parameters as a dict name -> tensor ({} for a plain function)."""
    if isinstance(metric, nn.Module):
        return dict(metric.named_parameters())
    return {}


def bind(metric, params):
    """The metric as a function of x alone with its parameters replaced by `params` (for torch.func);
    keeps the metric's closed-form `geodesic_rhs` if it has one."""
    if isinstance(metric, nn.Module) and params:
        bound = lambda x: torch.func.functional_call(metric, params, (x,))  # noqa: E731
        if getattr(metric, "geodesic_rhs", None) is not None:
            bound.geodesic_rhs = lambda x, v: metric.geodesic_rhs(x, v, params)
        return bound
    return metric
