"""Implicit differentiation of any inner solver through its optimality condition.

Given a solution z* of F(z, theta) = 0, found by any solver without an autograd
graph, :func:`implicit_root` returns z* attached to theta so that
    grad_theta = -(dF/dtheta)^T u,   (dF/dz)^T u = grad_z L,
one linear solve per backward pass. z and theta are tensors or nested
dicts/tuples/lists of tensors. F must be differentiable by torch.autograd.
"""
import functools
import warnings
from dataclasses import dataclass, field

import torch

from . import linear_solve
from .errors import BackwardSolveError, ConvergenceWarning, ImplicitDiffError, check_finite
from .pytree import Packer, tree_flatten, tree_unflatten


def default_residual_tol(dtype):
    """Inner residual tolerance used when none is given: eps^(1/3) of the dtype (6e-6 in float64)."""
    return torch.finfo(dtype).eps ** (1 / 3)


def default_solve_tol(dtype):
    """Backward linear-solve tolerance used when none is given: eps^0.6 of the dtype (4e-10 in float64)."""
    return torch.finfo(dtype).eps ** 0.6


@dataclass
class _Config:
    F: callable
    z_spec: object
    th_spec: object
    packer: Packer
    solve: object
    ridge: float
    tol: float
    strict: bool
    solve_opts: dict = field(default_factory=dict)


def _report(msg, strict, error_cls):
    if strict:
        raise error_cls(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=4)


def _worst(values):
    i = int(values.argmax())
    return float(values[i]), i


class _ImplicitRoot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, z_leaves, *th_leaves):
        ctx.cfg, ctx.z_leaves = cfg, z_leaves
        ctx.save_for_backward(*th_leaves)
        return tuple(t.clone() for t in z_leaves)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        cfg = ctx.cfg
        th_all = ctx.saved_tensors
        need = [i for i, t in enumerate(th_all) if ctx.needs_input_grad[2 + i]]
        pk = cfg.packer
        g = pk.pack([torch.zeros_like(z) if gz is None else gz for z, gz in zip(ctx.z_leaves, grads)])
        th_grads = [None] * len(th_all)
        if not need or not bool(g.any()):
            return (None, None, *th_grads)
        with torch.enable_grad():
            z = [t.detach().requires_grad_() for t in ctx.z_leaves]
            th = [t.detach().requires_grad_() if i in need else t.detach() for i, t in enumerate(th_all)]
            out = tree_flatten(cfg.F(tree_unflatten(z, cfg.z_spec), tree_unflatten(th, cfg.th_spec)))[0]

            def vjp_z(U):  # U: [B, n] or a stack [k, B, n]; returns (dF/dz)^T U
                stacked = U.dim() == 3
                cot = pk.unpack(U)
                res = torch.autograd.grad(out, z, cot, retain_graph=True, allow_unused=True,
                                          is_grads_batched=stacked)
                res = [torch.zeros_like(c) if r is None else r for r, c in zip(res, cot)]
                return pk.pack(res, n_lead=int(stacked))

            def jvp_z(U):  # (dF/dz) U by the double-vjp trick
                w = [torch.zeros_like(o, requires_grad=True) for o in out]
                gz = torch.autograd.grad(out, z, w, create_graph=True, retain_graph=True, allow_unused=True)
                gz_used = [(a, b) for a, b in zip(gz, pk.unpack(U)) if a is not None]
                res = torch.autograd.grad([a for a, _ in gz_used], w, [b for _, b in gz_used],
                                          retain_graph=True, allow_unused=True)
                return pk.pack([torch.zeros_like(o) if r is None else r for r, o in zip(res, out)])

            u = linear_solve.solve(cfg.solve, vjp_z, g, ridge=cfg.ridge, rmatvec=jvp_z,
                                   tol=cfg.tol, **cfg.solve_opts)
            rel = linear_solve.relative_residual(vjp_z, u, g, cfg.ridge)
            if not bool(torch.isfinite(u).all()) or not bool(torch.isfinite(rel).all()) or bool((rel > 0.1).any()):
                r, i = _worst(torch.nan_to_num(rel, nan=float("inf")))
                raise BackwardSolveError(
                    f"backward linear solve ({cfg.solve if isinstance(cfg.solve, str) else 'custom'}) failed: "
                    f"relative residual {r:.3g} for batch element {i}; the system dF/dz is singular or "
                    "ill-conditioned, or the solver does not fit it (cg needs symmetric positive definite); "
                    "try ridge>0, solve='gmres' or solve='dense'")
            if bool((rel > max(100 * cfg.tol, 1e-12)).any()):
                r, i = _worst(rel)
                _report(f"backward linear solve stopped at relative residual {r:.3g} > tol {cfg.tol:.3g} "
                        f"(batch element {i}); raise maxiter or use another solver", cfg.strict, BackwardSolveError)
            res = torch.autograd.grad(out, [th[i] for i in need], pk.unpack(-u), allow_unused=True)
        for i, r in zip(need, res):
            th_grads[i] = torch.zeros_like(th_all[i]) if r is None else r
        return (None, None, *th_grads)


def implicit_root(F, z, theta, *, batched=False, solve="gmres", ridge=0.0, tol=None, residual_tol=None,
                  strict=False, check_residual=True, **solve_opts):
    """Return z, differentiable in theta through the optimality condition F(z, theta) = 0.

    F: callable(z, theta) -> tree with the structure and shapes of z.
    z: tree of tensors, a (near) root found by any solver; it is detached.
    theta: tree of tensors the gradient flows to (everything differentiable F uses).
    batched: every z leaf has a leading dim B and F's slice b depends only on z's slice b:
        dF/dz is block diagonal and the backward solves B small systems at once.
    solve: name in bilevel.linear_solve.SOLVERS ('dense', 'cg', 'normal_cg', 'gmres',
        'bicgstab', 'neumann') or a callable solve(matvec, b, **opts) -> x on [B, n].
    ridge: damping; solves (dF/dz^T + ridge I) u = g.
    tol: relative tolerance of the backward solve (default eps^0.6 of z's dtype).
    residual_tol: max |F(z, theta)| accepted per problem (default eps^(1/3)); above it a
        ConvergenceWarning names the residual, or ImplicitDiffError when strict.
    solve_opts: passed to the linear solver (maxiter, restart, alpha, max_cond, ...).
    """
    z_leaves, z_spec = tree_flatten(z)
    th_leaves, th_spec = tree_flatten(theta)
    if not z_leaves or not all(torch.is_tensor(t) and t.is_floating_point() for t in z_leaves):
        raise ImplicitDiffError("z must be a floating-point tensor or a tree of them")
    if not all(torch.is_tensor(t) for t in th_leaves):
        raise ImplicitDiffError("theta must be a tensor or a tree of tensors; pass constants by closure")
    z_leaves = [t.detach() for t in z_leaves]
    check_finite(z_leaves, "z")
    check_finite(th_leaves, "theta")
    dtype = z_leaves[0].dtype
    packer = Packer.of(z_leaves, batched)
    if check_residual:
        with torch.no_grad():
            out = F(tree_unflatten(z_leaves, z_spec), theta)
        out_leaves, out_spec = tree_flatten(out)
        if out_spec != z_spec or [o.shape for o in out_leaves] != [t.shape for t in z_leaves]:
            raise ImplicitDiffError(
                f"F(z, theta) must return a tree shaped like z: z has shapes "
                f"{[tuple(t.shape) for t in z_leaves]}, F returned {[tuple(o.shape) for o in out_leaves]}")
        res = packer.pack(out_leaves).abs().amax(-1)
        if not bool(torch.isfinite(res).all()):
            raise ImplicitDiffError("F(z, theta) is NaN or inf at the given solution")
        rtol = default_residual_tol(dtype) if residual_tol is None else residual_tol
        if bool((res > rtol).any()):
            r, i = _worst(res)
            _report(f"inner residual max|F(z*, theta)| = {r:.3g} > residual_tol {rtol:.3g} "
                    f"(problem {i}): the implicit gradient assumes F(z*, theta) = 0 and may be wrong; "
                    "solve the inner problem further or use backward='unrolled'", strict, ImplicitDiffError)
    cfg = _Config(F, z_spec, th_spec, packer, solve, ridge,
                  default_solve_tol(dtype) if tol is None else tol, strict, solve_opts)
    out = _ImplicitRoot.apply(cfg, tuple(z_leaves), *th_leaves)
    return tree_unflatten(list(out), z_spec)


def fixed_point_residual(T):
    """The root form z - T(z, theta) of a fixed-point map T."""
    def F(z, theta):
        zl, spec = tree_flatten(z)
        return tree_unflatten([a - b for a, b in zip(zl, tree_flatten(T(z, theta))[0])], spec)
    return F


def implicit_fixed_point(T, z, theta, **opts):
    """Like implicit_root for a fixed point z = T(z, theta). With solve='neumann' the backward is
    the Neumann series u = sum_k (dT/dz^T)^k g."""
    return implicit_root(fixed_point_residual(T), z, theta, **opts)


def custom_root(F, **opts):
    """Decorator: make solver(init, theta, ...) -> z differentiable in theta through F(z, theta) = 0.

    The solver runs under torch.no_grad(); opts go to implicit_root."""
    def decorator(solver):
        @functools.wraps(solver)
        def wrapped(init, theta, *args, **kwargs):
            with torch.no_grad():
                z = solver(init, theta, *args, **kwargs)
            return implicit_root(F, z, theta, **opts)
        return wrapped
    return decorator


def custom_fixed_point(T, **opts):
    """Decorator like custom_root for a solver of z = T(z, theta)."""
    return custom_root(fixed_point_residual(T), **opts)
