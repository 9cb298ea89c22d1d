"""Geodesics between fixed ends by minimising the discrete path energy, batched over pairs.

A path is T + 1 nodes gamma_0 = x, ..., gamma_T = y at t_i = i / T; its energy is the midpoint rule
    E = 1/2 int gamma'^T A(gamma) gamma' dt ~ T/2 sum_i D_i^T A(m_i) D_i,  D_i = gamma_{i+1} - gamma_i,
m_i = (gamma_i + gamma_{i+1}) / 2. The interior is found by inexact Newton: the step solves the exact
Hessian system by a few preconditioned CG iterations (Hessian-vector products by double backward;
preconditioner: the Hessian with the metric frozen at the segment midpoints, a block-tridiagonal solve
per pair), with a per-pair backtracking step. The minimum energy is differentiable in the ends and the
metric's parameters by the envelope theorem: it is re-evaluated on the detached optimal interior.
"""
from dataclasses import dataclass

import torch

from .metric import check_pairs, check_spd


@dataclass
class PathResult:
    """path [B, T+1, d]; energy, length [B] (differentiable in x, y, metric params); converged [B]
    bool; residual [B] = max |step| of the last preconditioned update (0 for a converged pair)."""
    path: torch.Tensor
    energy: torch.Tensor
    length: torch.Tensor
    converged: torch.Tensor
    residual: torch.Tensor


def _segments(metric, path):
    D = path[:, 1:] - path[:, :-1]
    A = metric(0.5 * (path[:, 1:] + path[:, :-1]))
    return D, A, torch.einsum("bti,btij,btj->bt", D, A, D)


def curve_energy(metric, path):
    """1/2 int gamma'^T A(gamma) gamma' dt of paths [B, T+1, d] (both ends included) -> [B]."""
    _check_path(path)
    T = path.shape[1] - 1
    return 0.5 * T * _segments(metric, path)[2].sum(1)


def curve_length(metric, path):
    """int sqrt(gamma'^T A gamma') dt of paths [B, T+1, d] -> [B] (zero-length segments give 0, finite grad)."""
    _check_path(path)
    q = _segments(metric, path)[2]
    pos = q > 0
    return torch.where(pos, torch.where(pos, q, 1).sqrt(), 0).sum(1)


def _check_path(path):
    if path.dim() != 3 or path.shape[1] < 2:
        raise ValueError(f"a path must be [B, T+1, d] with T >= 1, got shape {tuple(path.shape)}")
    if not bool(torch.isfinite(path).all()):
        raise ValueError("path contains NaN or inf")


def _block_tridiag_factor(A):
    """Block LDL^T (Thomas) factors of H, the frozen-metric Hessian of the energy in the interior nodes.

    A [B, T, d, d] segment metrics (scaled by T); H has diagonal blocks A_j + A_{j+1} and off-diagonal
    blocks -A_{j+1}. Returns (A, Cholesky factors of the pivots, C_j = -M_j^{-1} A_{j+1}).
    A pivot that is not numerically positive definite (a metric degenerate or underflowing along the
    path) is replaced by the identity for that pair: the result is only a preconditioner."""
    n = A.shape[1] - 1
    Ls, C = [], []
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    for j in range(n):  # a loop over nodes, batched over pairs
        M = A[:, j] + A[:, j + 1]
        if j > 0:
            M = M + A[:, j] @ C[-1]  # sub-diagonal block is -A_j
        L, info = torch.linalg.cholesky_ex(M)
        Ls.append(torch.where((info == 0)[:, None, None] & torch.isfinite(L).all((1, 2), keepdim=True), L, eye))
        C.append(-torch.cholesky_solve(A[:, j + 1], Ls[-1]) if j + 1 < n else None)
    return A, Ls, C


def _block_tridiag_solve(fac, g):
    """Solve H s = g per pair with the factors of _block_tridiag_factor; g, s [B, T-1, d]."""
    A, Ls, C = fac
    gp = []
    for j, L in enumerate(Ls):
        rhs = g[:, j] if j == 0 else g[:, j] + (A[:, j] @ gp[-1][..., None])[..., 0]
        gp.append(torch.cholesky_solve(rhs[..., None], L)[..., 0])
    s = [gp[-1]]
    for j in range(len(Ls) - 2, -1, -1):
        s.append(gp[j] - (C[j] @ s[-1][..., None])[..., 0])
    return torch.stack(s[::-1], 1)


def _energy_grad(metric, x, y, Z):
    """Energy [B], its gradient in the interior Z [B, T-1, d] and the scaled segment metrics."""
    with torch.enable_grad():
        Z = Z.detach().requires_grad_()
        path = torch.cat([x[:, None], Z, y[:, None]], 1)
        T = path.shape[1] - 1
        _, A, q = _segments(metric, path)
        E = 0.5 * T * q.sum(1)
        (g,) = torch.autograd.grad(E.sum(), Z)
    return E.detach(), g, T * A.detach()


def geodesic_path(metric, x, y, *, n_nodes=17, init=None, max_iter=200, tol=None):
    """Minimise the discrete path energy between x [B, d] and y [B, d] -> PathResult.

    n_nodes: nodes per path including both ends (T + 1); init: a starting path [B, T+1, d]
    (its ends are replaced by x, y) or None for the straight line; tol: stop a pair when the
    max-abs preconditioned step is below it (default eps^(1/2) of the dtype)."""
    check_pairs(x, y)
    B, d = x.shape
    if init is None:
        if n_nodes < 2:
            raise ValueError(f"n_nodes must be >= 2, got {n_nodes}")
        t = torch.linspace(0, 1, n_nodes, dtype=x.dtype, device=x.device)[None, :, None]
        Z = ((1 - t) * x.detach()[:, None] + t * y.detach()[:, None])[:, 1:-1]
    else:
        if init.dim() != 3 or init.shape[0] != B or init.shape[2] != d or init.shape[1] < 2:
            raise ValueError(f"init must be a path [B={B}, T+1, d={d}], got shape {tuple(init.shape)}")
        Z = init.detach()[:, 1:-1].clone()
    tol = torch.finfo(x.dtype).eps ** 0.5 if tol is None else tol
    xd, yd = x.detach(), y.detach()
    with torch.no_grad():
        if Z.shape[1] > 0:
            Z, conv, res = _minimise(metric, xd, yd, Z, max_iter, tol)
        else:
            conv = torch.ones(B, dtype=torch.bool, device=x.device)
            res = torch.zeros(B, dtype=x.dtype, device=x.device)
    path = torch.cat([x[:, None], Z, y[:, None]], 1)  # graph to the ends and the metric only
    energy = curve_energy(metric, path)
    return PathResult(path, energy, curve_length(metric, path), conv, res)


def _dot(a, b):
    return (a * b).sum((1, 2))


def _newton_step(metric, x, y, Z, g, A, cg_iter=8):
    """Inexact Newton direction: H s = g by preconditioned CG per pair, with exact Hessian-vector
    products of the energy and the frozen-metric block-tridiagonal preconditioner; a pair whose
    Hessian shows non-positive curvature keeps its iterate so far (the preconditioned gradient if none)."""
    with torch.enable_grad():
        Zr = Z.detach().requires_grad_()
        path = torch.cat([x[:, None], Zr, y[:, None]], 1)
        (gr,) = torch.autograd.grad(0.5 * (path.shape[1] - 1) * _segments(metric, path)[2].sum(), Zr,
                                    create_graph=True)
    fac = _block_tridiag_factor(A)
    s, r = torch.zeros_like(g), g.clone()
    z = _block_tridiag_solve(fac, r)
    p, rz = z, _dot(r, z)
    live = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
    gn = g.flatten(1).norm(dim=1)
    for _ in range(cg_iter):
        Hp = torch.autograd.grad(gr, Zr, p, retain_graph=True)[0].detach()
        pHp = _dot(p, Hp)
        live = live & (pHp > 0) & torch.isfinite(pHp)
        if not bool(live.any()):
            break
        a = torch.where(live, rz / torch.where(live, pHp, 1), torch.zeros_like(rz))[:, None, None]
        s, r = s + a * p, r - a * Hp
        live = live & (r.flatten(1).norm(dim=1) > 1e-4 * gn)
        z = _block_tridiag_solve(fac, r)
        rz_new = _dot(r, z)
        p = z + (rz_new / torch.where(rz != 0, rz, 1))[:, None, None] * p
        rz = rz_new
    empty = (s == 0).flatten(1).all(1)
    return torch.where(empty[:, None, None], _block_tridiag_solve(fac, g), s)


def _minimise(metric, x, y, Z, max_iter, tol):
    """Preconditioned descent on the interior nodes Z [B, T-1, d]; only unconverged pairs are iterated."""
    B = x.shape[0]
    Z_out = Z.clone()
    res = torch.full((B,), float("inf"), dtype=x.dtype, device=x.device)
    idx = torch.arange(B, device=x.device)
    E, g, A = _energy_grad(metric, x, y, Z)
    check_spd(A, "metric along the path")
    s = _newton_step(metric, x, y, Z, g, A)
    alpha = torch.ones(B, dtype=x.dtype, device=x.device)
    slack = 4 * torch.finfo(x.dtype).eps
    for _ in range(max_iter):
        res[idx] = s.abs().amax((1, 2))
        Z_out[idx] = Z
        keep = (res[idx] > tol) & (alpha > 1e-12)
        if not bool(keep.any()):
            break
        idx, Z, E, g, A, s, alpha = (t[keep] for t in (idx, Z, E, g, A, s, alpha))
        Zc = Z - alpha[:, None, None] * s
        Ec, gc, Ac = _energy_grad(metric, x[idx], y[idx], Zc)
        ok = torch.isfinite(Ec) & (Ec <= E + slack * E.abs())
        Z = torch.where(ok[:, None, None], Zc, Z)
        E = torch.where(ok, Ec, E)
        g = torch.where(ok[:, None, None], gc, g)
        A = torch.where(ok[:, None, None, None], torch.nan_to_num(Ac), A)
        s = torch.where(ok[:, None, None], _newton_step(metric, x[idx], y[idx], Z, g, A), s)
        alpha = torch.where(ok, (2 * alpha).clamp(max=1), alpha / 2)
    Z_out[idx] = Z
    res[idx] = s.abs().amax((1, 2))
    conv = res <= tol
    return Z_out, conv, torch.where(conv, torch.zeros_like(res), res)
