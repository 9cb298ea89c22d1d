"""Geodesics by shooting, batched over pairs: exp map (torchdiffeq), log map (damped Newton on the
boundary condition exp_x(v) = y), distance and interpolation with implicit gradients.

The geodesic ODE is written without the d^3 Christoffel tensor: from the Lagrangian 1/2 v^T A(x) v,
    x'' = A(x)^{-1} (1/2 grad_x (v^T A(x) v) - (dA/dt) v),   (dA/dt) v = JVP of A along v,
one VJP and one JVP of the metric per evaluation. The metric must act pointwise on a batch.
"""
import warnings
from dataclasses import dataclass

import torch
from torchdiffeq import odeint

import bilevel

from .metric import bind, check_pairs, check_spd, metric_params
from .path_energy import geodesic_path

FIXED = ("rk4", "euler", "midpoint", "explicit_adams")


def geodesic_acceleration(metric, x, v):
    """Right-hand side x'' of the geodesic ODE at positions x [B, d] with velocities v [B, d] -> [B, d].
    A metric with a `geodesic_rhs(x, v)` method (solvers.metric.NeuralMetric) supplies its own."""
    fused = getattr(metric, "geodesic_rhs", None)
    if fused is not None:
        return fused(x, v)
    A, dA = torch.func.jvp(metric, (x,), (v,))
    _, vjp_fn = torch.func.vjp(metric, x)
    (grad_q,) = vjp_fn(v[..., :, None] * v[..., None, :])
    rhs = 0.5 * grad_q - (dA @ v[..., None])[..., 0]
    return torch.linalg.solve(A, rhs)


def _odeint(func, state, *, steps, method, rtol, atol):
    t = torch.tensor([0.0, 1.0], dtype=state[0].dtype, device=state[0].device)
    if method in FIXED:
        out = odeint(func, state, t, method=method, options={"step_size": 1.0 / steps})
    else:
        out = odeint(func, state, t, method=method, rtol=rtol, atol=atol)
    return tuple(o[-1] for o in out)


def exp_map(metric, x, v, *, steps=32, method="rk4", rtol=1e-10, atol=1e-12, return_velocity=False):
    """Position at t = 1 of the geodesic from x [B, d] with initial velocity v [B, d] -> y [B, d].

    method: a fixed-grid torchdiffeq method ('rk4', ...) with `steps` steps, or an adaptive one
    ('dopri5', 'dopri8', ...) with rtol/atol. Differentiable by autograd in x, v and the metric."""
    check_pairs(x, v, ("x", "v"))

    def f(t, s):
        return s[1], geodesic_acceleration(metric, s[0], s[1])

    y, w = _odeint(f, (x, v), steps=steps, method=method, rtol=rtol, atol=atol)
    return (y, w) if return_velocity else y


def exp_map_jacobian(metric, x, v, *, steps=32, method="rk4", rtol=1e-10, atol=1e-12):
    """exp_x(v) [B, d] and its Jacobian d exp_x(v) / dv [B, d, d] by the variational equations:
    the JVP of the geodesic ODE along the d unit directions, folded into the batch, integrated
    together with the geodesic."""
    B, d = x.shape
    acc = lambda x_, v_: geodesic_acceleration(metric, x_, v_)  # noqa: E731

    def fold(X):  # [B, d, d] columns -> [d * B, d]
        return X.permute(2, 0, 1).reshape(d * B, d)

    def f(t, s):
        xs, vs, X, V = s
        a, dA = torch.func.jvp(acc, (xs.repeat(d, 1), vs.repeat(d, 1)),
                               (fold(X), fold(V)))
        return vs, a[:B], V, dA.reshape(d, B, d).permute(1, 2, 0)

    X0 = torch.zeros(B, d, d, dtype=x.dtype, device=x.device)
    V0 = torch.eye(d, dtype=x.dtype, device=x.device).expand(B, d, d).contiguous()
    y, _, J, _ = _odeint(f, (x, v, X0, V0), steps=steps, method=method, rtol=rtol, atol=atol)
    return y, J


@dataclass
class LogInfo:
    """Per pair: converged [B] bool, residual [B] = max |exp_x(v) - y|, iterations used (all pairs)."""
    converged: torch.Tensor
    residual: torch.Tensor
    iterations: int


def default_tol(dtype):
    """Shooting tolerance on max |exp_x(v) - y|: 1e-10 in float64, 1e-4 in float32."""
    return 1e-10 if dtype == torch.float64 else 1e-4


def initial_velocity(metric, x, y, n_nodes=9, max_iter=20):
    """A shooting start from the discrete path-energy geodesic: the second-order one-sided
    difference of its first nodes (T (-3 g0 + 4 g1 - g2) / 2), or y - x with one segment."""
    path = geodesic_path(metric, x, y, n_nodes=n_nodes, max_iter=max_iter, tol=1e-4).path.detach()
    T = path.shape[1] - 1
    if T < 2:
        return y - x
    return T * (-3 * path[:, 0] + 4 * path[:, 1] - path[:, 2]) / 2


def _shoot(metric, x, y, v, tol, max_iter, ode, jac_steps):
    """Quasi-Newton shooting on r(v) = exp_x(v) - y, batched; only unconverged pairs are iterated.

    The residual uses the full-accuracy integrator. The Jacobian starts from the variational
    equations on a coarse RK4 grid (jac_steps steps), is kept current by Broyden's rank-1 secant
    update after every trial step, and is recomputed on the full-accuracy integrator for a pair whose
    step was rejected (so a short enough step then always descends); a per-pair
    step length halves on rejection and doubles (up to 1) on success.
    Returns v [B, d], converged [B], residual [B], iterations, and the Jacobian estimate [B, d, d]."""
    B = x.shape[0]
    v = torch.where(torch.isfinite(v).all(-1, keepdim=True), v, y - x)
    v_out, res = v.clone(), torch.full((B,), float("inf"), dtype=x.dtype, device=x.device)
    idx = torch.arange(B, device=x.device)

    def residual(i, vv):
        r = exp_map(metric, x[i], vv, **ode) - y[i]
        rn = r.abs().amax(-1)
        return r, torch.where(torch.isfinite(rn), rn, torch.full_like(rn, float("inf")))

    def jacobian(i, vv, exact=False):
        opts = ode if exact else dict(steps=jac_steps, method="rk4")
        return torch.nan_to_num(exp_map_jacobian(metric, x[i], vv, **opts)[1])

    r, rn = residual(idx, v)
    J = jacobian(idx, v)
    J_out = J.clone()
    alpha = torch.ones(B, dtype=x.dtype, device=x.device)
    it = 0
    for it in range(1, max_iter + 1):
        res[idx], v_out[idx], J_out[idx] = rn, v, J
        keep = (rn > tol) & (alpha > 1e-8)
        if not bool(keep.any()):
            break
        idx, v, r, rn, J, alpha = (t[keep] for t in (idx, v, r, rn, J, alpha))
        dv, bad = torch.linalg.solve_ex(J, r)
        bad = (bad != 0) | ~torch.isfinite(dv).all(-1)
        dv = torch.where(bad[:, None], r, dv)  # singular Jacobian: fall back to a plain residual step
        vc = v - alpha[:, None] * dv
        vc = torch.where(torch.isfinite(vc).all(-1, keepdim=True), vc, v)  # a NaN step is a rejected one
        rc, rnc = residual(idx, vc)
        ok = rnc < rn
        s_, y_ = vc - v, rc - r
        ss = (s_ * s_).sum(-1)
        sec = torch.isfinite(rnc) & (ss > 0)
        upd = (y_ - (J @ s_[..., None])[..., 0])[..., None] * s_[:, None, :] / torch.where(sec, ss, 1)[:, None, None]
        J = torch.where(sec[:, None, None], J + upd, J)
        v = torch.where(ok[:, None], vc, v)
        r = torch.where(ok[:, None], rc, r)
        rn = torch.where(ok, rnc, rn)
        if not bool(ok.all()):  # rejected: the Jacobian of the full-accuracy map (a true Newton step)
            J[~ok] = jacobian(idx[~ok], v[~ok], exact=True)
        alpha = torch.where(ok, (2 * alpha).clamp(max=1), alpha / 2)
    res[idx], v_out[idx], J_out[idx] = rn, v, J
    return v_out, res <= tol, res, it, J_out


def preconditioned_solve(J):
    """A linear solver for bilevel.implicit_root: (dF/dv)^T u = g by iterative refinement
    preconditioned with the shooting Jacobian estimate J [B, d, d] (one exact VJP per sweep);
    falls back to the dense solve if the refinement does not contract."""
    LU, piv = torch.linalg.lu_factor(J)

    def solve(matvec, b, *, tol=1e-10, maxiter=30, **opts):
        u = torch.linalg.lu_solve(LU, piv, b[..., None], adjoint=True)[..., 0]
        bn = b.norm(dim=-1).clamp_min(torch.finfo(b.dtype).tiny)
        prev = None
        for _ in range(maxiter):
            rr = b - matvec(u)
            rel = rr.norm(dim=-1) / bn
            if bool((rel <= tol).all()):
                return u
            worst = float(rel.max())
            if prev is not None and not worst < 0.5 * prev:
                break
            prev = worst
            u = u + torch.linalg.lu_solve(LU, piv, rr[..., None], adjoint=True)[..., 0]
        return bilevel.linear_solve.dense(matvec, b, **opts)
    return solve


def _check_metric_at(metric, x, y):
    with torch.no_grad():
        check_spd(metric(x.detach()), "metric at x")
        check_spd(metric(y.detach()), "metric at y")


def log_map(metric, x, y, *, init=None, tol=None, max_iter=50, steps=32, method="rk4", rtol=1e-10,
            atol=1e-12, jac_steps=4, solve="shooting", strict=False, return_info=False):
    """Initial velocity v [B, d] of the geodesic from x [B, d] to y [B, d]: exp_x(v) = y.

    init: a warm start [B, d] (e.g. the previous training step's v); None starts from the discrete
    path-energy geodesic. Pairs that fail get a second start from a finer path-energy geodesic.
    Quasi-Newton shooting with a per-pair backtracking step until max |exp_x(v) - y| <= tol;
    steps/method/rtol/atol set the exp-map integrator, jac_steps the RK4 grid of its Jacobian.
    solve: the backward linear solve, 'shooting' (iterative refinement preconditioned by the
    shooting Jacobian: a few VJPs through exp) or any bilevel solver name such as 'dense'.
    Pairs that do not converge are reported by a bilevel.ConvergenceWarning with their count and
    worst residual (bilevel.ImplicitDiffError when strict) and flagged in info.converged.
    Differentiable in x, y and the metric's parameters by the implicit function theorem on
    exp_x(v; theta) - y = 0 (one batched d x d system per backward)."""
    check_pairs(x, y)
    _check_metric_at(metric, x, y)
    tol = default_tol(x.dtype) if tol is None else tol
    ode = dict(steps=steps, method=method, rtol=rtol, atol=atol)
    with torch.no_grad():
        xd, yd = x.detach(), y.detach()
        if init is None:
            v0 = initial_velocity(metric, xd, yd)
        else:
            check_pairs(x, init, ("x", "init"))
            v0 = init.detach()
        v0 = torch.where((xd == yd).all(-1, keepdim=True), torch.zeros_like(v0), v0)  # exact 0 at x = y
        v, conv, res, its, J = _shoot(metric, xd, yd, v0, tol, max_iter, ode, jac_steps)
        if not bool(conv.all()):  # second chance for the failures: a finer, longer path-energy start
            bad = (~conv).nonzero()[:, 0]
            vb = initial_velocity(metric, xd[bad], yd[bad], n_nodes=33, max_iter=500)
            out = _shoot(metric, xd[bad], yd[bad], vb, tol, max_iter, ode, jac_steps)
            better = out[2] < res[bad]
            for buf, new in zip((v, conv, res, J), (out[0], out[1], out[2], out[4])):
                buf[bad[better]] = new[better]
            its += out[3]
    if not bool(conv.all()):
        n = int((~conv).sum())
        msg = (f"log map: {n} of {len(conv)} pairs did not converge (worst residual max|exp_x(v) - y| = "
               f"{float(res.max()):.3g} > tol {tol:.3g}); see info.converged, raise max_iter or steps, "
               "or pass a better init")
        if strict:
            raise bilevel.ImplicitDiffError(msg)
        warnings.warn(msg, bilevel.ConvergenceWarning, stacklevel=2)
    params = metric_params(metric)
    theta = {"x": x, "y": y, "metric": params}
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, *params.values())):
        def F(v_, th):
            return exp_map(bind(metric, th["metric"]), th["x"], v_, **ode) - th["y"]
        solver = preconditioned_solve(J) if solve == "shooting" else solve
        v = bilevel.implicit_root(F, v, theta, batched=True, solve=solver, check_residual=False)
    info = LogInfo(conv, res, its)
    return (v, info) if return_info else v


def _safe_sqrt(q):
    pos = q > 0
    return torch.where(pos, torch.where(pos, q, 1).sqrt(), torch.zeros_like(q))


def distance(metric, x, y, *, init=None, return_info=False, **log_opts):
    """Geodesic distance sqrt(v^T A(x) v), v = log_x(y), x, y [B, d] -> [B]; zero with a finite
    (zero) gradient at x = y. log_opts go to log_map."""
    v, info = log_map(metric, x, y, init=init, return_info=True, **log_opts)
    d = _safe_sqrt(torch.einsum("bi,bij,bj->b", v, metric(x), v))
    return (d, info) if return_info else d


def interpolate(metric, x, y, t, *, init=None, return_info=False, **log_opts):
    """Points exp_x(t v), v = log_x(y), on the geodesic from x [B, d] to y [B, d] at times t
    (1-D, in [0, 1]) -> [len(t), B, d]. Differentiable in x, y and the metric (implicit gradient)."""
    v, info = log_map(metric, x, y, init=init, return_info=True, **log_opts)
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    n, (B, d) = t.shape[0], x.shape
    ode = {k: log_opts[k] for k in ("steps", "method", "rtol", "atol") if k in log_opts}
    out = exp_map(metric, x.expand(n, B, d).reshape(n * B, d), (t * v).reshape(n * B, d), **ode)
    out = out.reshape(n, B, d)
    return (out, info) if return_info else out
