"""Batched c-transform: g^c(x_b) = min_z f(x_b, z_b) for B independent problems.

f(x, z, params) -> [B] is c(x, y) - g(y) where z = y [B, d], or z = (y, auxiliary variables)
flattened to [B, m] when the cost is itself a minimum (e.g. a path's interior nodes, so that
min_z jointly solves the geodesic and the c-transform). Problem b may depend only on x[b], z[b].
The optimality condition is grad_z f(x, z, params) = 0.

The minimiser is found by a batched L-BFGS (per-problem two-loop recursion and Armijo
backtracking) without an autograd graph. Gradients of the value to x and params:
- backward="envelope": the value is re-evaluated at the detached minimiser (envelope theorem);
  z is returned detached.
- backward="implicit": z is attached to (x, params) by bilevel.implicit_root on the optimality
  condition (batched dense solves of the m x m Hessians), and the value is evaluated on it.
"""
from dataclasses import dataclass

import torch

import bilevel


@dataclass
class CTransformResult:
    """value [B] = min_z f; z [B, m] the minimiser; converged [B]; residual [B] = max |grad_z f|;
    iterations: L-BFGS iterations run."""
    value: torch.Tensor
    z: torch.Tensor
    converged: torch.Tensor
    residual: torch.Tensor
    iterations: int


def optimality(f):
    """The c-transform's optimality condition F(z, (x, params)) = grad_z f(x, z, params) [B, m]."""
    def F(z, theta):
        x, params = theta
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.requires_grad_()
            return torch.autograd.grad(f(x, z, params).sum(), z, create_graph=True)[0]
    return F


def _value_grad(f, x, z, params):
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        v = f(x, z, params)
        (g,) = torch.autograd.grad(v.sum(), z)
    return v.detach(), g.detach()


def _dot(a, b):
    return (a * b).sum(-1)


def lbfgs(fun, z0, *, max_iter=100, tol=1e-6, history=10, max_backtrack=30):
    """Minimise B independent problems; fun(z [B, m]) -> (value [B], grad [B, m]).

    Returns (z, value, grad, converged [B], iterations). A problem stops when max |grad| <= tol."""
    z = z0.detach().clone()
    v, g = fun(z)
    S, Y = [], []
    it = 0
    for it in range(1, max_iter + 1):
        active = g.abs().amax(-1) > tol
        if not bool(active.any()):
            it -= 1
            break
        q = g.clone()
        alphas, rhos = [], []
        for s, y in zip(reversed(S), reversed(Y)):
            ys = _dot(y, s)
            rho = torch.where(ys > 1e-300, 1 / ys.clamp_min(1e-300), torch.zeros_like(ys))
            a = rho * _dot(s, q)
            q = q - a[:, None] * y
            alphas.append(a)
            rhos.append(rho)
        if S:
            ys, yy = _dot(Y[-1], S[-1]), _dot(Y[-1], Y[-1])
            gamma = torch.where((ys > 0) & (yy > 0), ys / yy.clamp_min(1e-300), torch.ones_like(ys))
            q = gamma[:, None] * q
        for s, y, a, rho in zip(S, Y, reversed(alphas), reversed(rhos)):
            b = rho * _dot(y, q)
            q = q + (a - b)[:, None] * s
        d = -q
        slope = _dot(d, g)
        bad = ~(slope < 0)
        d = torch.where(bad[:, None], -g, d)
        slope = torch.where(bad, -_dot(g, g), slope)
        d = d * active[:, None]
        t = torch.ones_like(v)
        done = ~active
        z_new, v_new, g_new = z.clone(), v.clone(), g.clone()
        slack = 16 * torch.finfo(v.dtype).eps * (1 + v.abs())  # round-off in f near the minimum
        for _ in range(max_backtrack):
            zt = z + t[:, None] * d
            vt, gt = fun(zt)
            ok = (~done) & torch.isfinite(vt) & (vt <= v + 1e-4 * t * slope + slack)
            z_new[ok], v_new[ok], g_new[ok] = zt[ok], vt[ok], gt[ok]
            done = done | ok
            if bool(done.all()):
                break
            t = torch.where(done, t, 0.5 * t)
        S.append(z_new - z)
        Y.append(g_new - g)
        if len(S) > history:
            S.pop(0)
            Y.pop(0)
        z, v, g = z_new, v_new, g_new
    converged = g.abs().amax(-1) <= tol
    return z, v, g, converged, it


def c_transform(f, x, z0, params=(), *, max_iter=100, tol=1e-6, history=10, backward="envelope",
                **implicit_opts):
    """Solve min_z f(x, z, params) per problem -> CTransformResult.

    x: [B, ...] the points; z0: [B, m] warm start (e.g. an amortised map T(x)); params: tensor
    tree of everything differentiable f uses besides x (for backward='implicit' it must hold all
    of it: pass module parameters through torch.func.functional_call). implicit_opts go to
    bilevel.implicit_root (default solve='dense')."""
    if z0.dim() != 2 or z0.shape[0] != x.shape[0]:
        raise ValueError(f"z0 must be [B, m] with B = x.shape[0] = {x.shape[0]}, got {tuple(z0.shape)}")
    if backward not in ("envelope", "implicit"):
        raise ValueError(f"backward must be 'envelope' or 'implicit', got {backward!r}")
    xd = x.detach()
    with torch.no_grad():
        z, _, g, conv, it = lbfgs(lambda zz: _value_grad(f, xd, zz, params), z0, max_iter=max_iter, tol=tol,
                                  history=history)
    if backward == "implicit":
        opts = {"solve": "dense", "residual_tol": max(tol, 1e-12) * 10, **implicit_opts}
        z = bilevel.implicit_root(optimality(f), z, (x, params), batched=True, **opts)
    return CTransformResult(f(x, z, params), z, conv, g.abs().amax(-1), it)
