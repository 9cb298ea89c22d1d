"""Check an engine gradient against central finite differences in float64."""
from dataclasses import dataclass

import torch

from .pytree import tree_flatten, tree_unflatten


@dataclass
class GradCheck:
    """Result of :func:`check_gradient`: directional derivatives, analytic vs numeric."""

    analytic: torch.Tensor
    numeric: torch.Tensor
    max_abs_err: float
    max_rel_err: float
    ok: bool

    def __bool__(self):
        return self.ok


def check_gradient(outer, theta, *, eps=1e-6, rtol=1e-5, atol=1e-8, n_directions=None, seed=0):
    """Compare autograd's gradient of the scalar outer(theta) with central differences.

    theta: float64 tensor or tree of them. If the total size is at most 64 (or
    n_directions is None and small), each coordinate is checked; otherwise
    n_directions random unit directions (default 8). Returns a GradCheck; bool(result)
    is True when |analytic - numeric| <= atol + rtol |numeric| in every direction.
    """
    leaves, spec = tree_flatten(theta)
    if any(t.dtype != torch.float64 for t in leaves):
        raise TypeError("check_gradient needs float64 theta: finite differences in float32 are meaningless")
    leaves = [t.detach() for t in leaves]
    sizes = [t.numel() for t in leaves]
    n = sum(sizes)
    flat = torch.cat([t.reshape(-1) for t in leaves])

    def f(vec):
        parts, i = [], 0
        for t, k in zip(leaves, sizes):
            parts.append(vec[i:i + k].reshape(t.shape))
            i += k
        return outer(tree_unflatten(parts, spec))

    x = flat.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(x), x)
    if n_directions is None and n <= 64:
        dirs = torch.eye(n, dtype=flat.dtype)
    else:
        gen = torch.Generator().manual_seed(seed)
        dirs = torch.randn(n_directions or 8, n, generator=gen, dtype=flat.dtype)
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
    with torch.no_grad():
        numeric = torch.stack([(f(flat + eps * d) - f(flat - eps * d)) / (2 * eps) for d in dirs])
    analytic = dirs @ g.detach()
    err = (analytic - numeric).abs()
    rel = err / numeric.abs().clamp_min(atol)
    return GradCheck(analytic, numeric, float(err.max()), float(rel.max()),
                     bool((err <= atol + rtol * numeric.abs()).all()))
