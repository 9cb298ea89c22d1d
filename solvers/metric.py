"""Riemannian metric fields on R^d: x [..., d] -> A(x) [..., d, d], symmetric positive definite.

A metric is any callable; learned metrics are torch.nn.Module instances whose parameters are
what gets trained. Closed forms (Euclidean, Poincare ball, sphere by inverse stereographic
projection) come with their exact distances for validation.
"""
import math

import torch
from torch import nn


class NeuralMetric(nn.Module):
    """A(x) = L(x) L(x)^T + eps I with L(x) [d, d] from a smooth (tanh) MLP; SPD by construction.

    init_identity: the last layer starts at zero and L has the constant part sqrt(1 - eps) I, so
    A = I at initialisation (the first log-map guess y - x is then exact)."""

    def __init__(self, dim, hidden=64, depth=2, eps=1e-3, init_identity=True):
        super().__init__()
        if dim < 1 or depth < 1 or not 0 < eps < 1:
            raise ValueError(f"NeuralMetric needs dim >= 1, depth >= 1, 0 < eps < 1; got {dim}, {depth}, {eps}")
        self.dim, self.eps = dim, eps
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

    def forward(self, x):
        """x [..., d] -> A [..., d, d]."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"NeuralMetric of dim {self.dim} got points of shape {tuple(x.shape)}")
        L = self.base.to(x.dtype) + self.out(self.body(x)).unflatten(-1, (self.dim, self.dim))
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        return L @ L.transpose(-1, -2) + self.eps * eye


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
    """The metric as a function of x alone with its parameters replaced by `params` (for torch.func)."""
    if isinstance(metric, nn.Module) and params:
        return lambda x: torch.func.functional_call(metric, params, (x,))
    return metric
