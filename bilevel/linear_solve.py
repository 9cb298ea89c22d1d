"""Batched linear solvers with one signature: ``solve(matvec, b, **opts) -> x``.

``b`` is [B, n]: B independent systems A_b x_b = b_b (a block-diagonal operator).
``matvec`` maps [B, n] -> [B, n] and applies A_b to row b. Every solver takes
``tol`` (relative residual per system) and ``maxiter``; ridge damping
(A + ridge I) is applied by :func:`solve` for all of them. A user's own solver
with the same signature can be passed wherever a name is accepted.
"""
import torch

from .errors import BackwardSolveError


def _dot(x, y):
    return (x * y).sum(-1, keepdim=True)


def _safe_div(num, den):
    return torch.where(den != 0, num / torch.where(den != 0, den, 1), torch.zeros_like(num))


def _basis_columns(matvec, b):
    """Materialise A as [B, n, n] from one call of matvec on the stack of n unit vectors [n, B, n]."""
    n = b.shape[-1]
    basis = torch.eye(n, dtype=b.dtype, device=b.device)[:, None, :].expand(n, b.shape[0], n)
    return matvec(basis).permute(1, 2, 0)  # column i is A e_i


def dense(matvec, b, *, max_cond=None, **_):
    """Materialise each A_b and solve by batched LU; raise on singular/ill-conditioned A_b.

    matvec must also accept a stack [k, B, n] (the engine's does, by batched vjps)."""
    A = _basis_columns(matvec, b)
    max_cond = max_cond or 0.1 / torch.finfo(b.dtype).eps
    cond = torch.linalg.cond(A)
    bad = ~torch.isfinite(cond) | (cond > max_cond)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise BackwardSolveError(
            f"backward system is singular or ill-conditioned: condition number {float(cond[i]):.3g} "
            f"> {max_cond:.3g} for batch element {i}; pass ridge>0 or check that the inner solution "
            "is a nondegenerate root")
    return torch.linalg.solve(A, b)


def cg(matvec, b, *, tol=1e-10, maxiter=None, x0=None, **_):
    """Conjugate gradients; A_b must be symmetric positive definite."""
    maxiter = maxiter or 10 * b.shape[-1]
    x = torch.zeros_like(b) if x0 is None else x0
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = _dot(r, r)
    stop = (tol * b.norm(dim=-1, keepdim=True)) ** 2
    for _ in range(maxiter):
        if bool((rs <= stop).all()):
            break
        Ap = matvec(p)
        alpha = _safe_div(rs, _dot(p, Ap))
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = _dot(r, r)
        p = r + _safe_div(rs_new, rs) * p
        rs = rs_new
    return x


def normal_cg(matvec, b, *, rmatvec=None, tol=1e-10, maxiter=None, x0=None, **_):
    """CG on the normal equations A A^T y = b, x = A^T y; for any nonsingular A. Needs rmatvec (A^T)."""
    if rmatvec is None:
        raise ValueError("normal_cg needs rmatvec (the transpose operator)")
    y = cg(lambda v: matvec(rmatvec(v)), b, tol=tol, maxiter=maxiter)
    return rmatvec(y)


def bicgstab(matvec, b, *, tol=1e-10, maxiter=None, x0=None, **_):
    """Stabilised biconjugate gradients for nonsymmetric A_b."""
    maxiter = maxiter or 10 * b.shape[-1]
    x = torch.zeros_like(b) if x0 is None else x0
    r = b - matvec(x) if x0 is not None else b.clone()
    r_hat = r.clone()
    rho = alpha = omega = torch.ones_like(b[:, :1])
    v = p = torch.zeros_like(b)
    stop = tol * b.norm(dim=-1, keepdim=True)
    for _ in range(maxiter):
        if bool((r.norm(dim=-1, keepdim=True) <= stop).all()):
            break
        rho_new = _dot(r_hat, r)
        beta = _safe_div(rho_new, rho) * _safe_div(alpha, omega)
        p = r + beta * (p - omega * v)
        v = matvec(p)
        alpha = _safe_div(rho_new, _dot(r_hat, v))
        s = r - alpha * v
        t = matvec(s)
        omega = _safe_div(_dot(t, s), _dot(t, t))
        x = x + alpha * p + omega * s
        r = s - omega * t
        rho = rho_new
    return x


def gmres(matvec, b, *, tol=1e-10, maxiter=None, restart=30, x0=None, **_):
    """Restarted GMRES (Arnoldi + batched least squares) for nonsymmetric A_b."""
    B, n = b.shape
    m = min(restart, n)
    maxiter = maxiter or 10 * n
    x = torch.zeros_like(b) if x0 is None else x0
    bnorm = b.norm(dim=-1)
    done = 0
    while done < maxiter:
        r = b - matvec(x)
        beta = r.norm(dim=-1)
        if bool((beta <= tol * bnorm).all()):
            break
        V = [_safe_div(r, beta[:, None])]
        H = torch.zeros(B, m + 1, m, dtype=b.dtype, device=b.device)
        k = 0
        for k in range(m):
            w = matvec(V[k])
            for j in range(k + 1):  # modified Gram-Schmidt
                H[:, j, k] = _dot(w, V[j])[:, 0]
                w = w - H[:, j, k, None] * V[j]
            H[:, k + 1, k] = w.norm(dim=-1)
            V.append(_safe_div(w, H[:, k + 1, k, None]))
            done += 1
            if bool((H[:, k + 1, k] <= 1e-14 * beta).all()) or done >= maxiter:
                break
        k += 1
        e1 = torch.zeros(B, k + 1, 1, dtype=b.dtype, device=b.device)
        e1[:, 0, 0] = beta
        y = torch.linalg.lstsq(H[:, :k + 1, :k], e1).solution  # [B, k, 1]
        x = x + (torch.stack(V[:k], dim=-1) @ y)[..., 0]
    return x


def neumann(matvec, b, *, tol=1e-10, maxiter=None, alpha=1.0, **_):
    """Truncated Neumann series / Richardson: x <- x + alpha (b - A x); needs spectral radius of I - alpha A < 1."""
    maxiter = maxiter or 1000
    x = alpha * b
    stop = tol * b.norm(dim=-1, keepdim=True)
    for _ in range(maxiter - 1):
        r = b - matvec(x)
        if bool((r.norm(dim=-1, keepdim=True) <= stop).all()):
            break
        x = x + alpha * r
    return x


SOLVERS = {"dense": dense, "cg": cg, "normal_cg": normal_cg, "bicgstab": bicgstab,
           "gmres": gmres, "neumann": neumann}


def solve(method, matvec, b, *, ridge=0.0, rmatvec=None, **opts):
    """Solve (A + ridge I) x = b with a solver given by name (see SOLVERS) or as a callable."""
    fn = SOLVERS.get(method) if isinstance(method, str) else method
    if fn is None:
        raise ValueError(f"unknown linear solver {method!r}; choose from {sorted(SOLVERS)} or pass a callable")
    if ridge:
        mv, rmv = matvec, rmatvec
        matvec = lambda v: mv(v) + ridge * v  # noqa: E731
        if rmv is not None:
            rmatvec = lambda v: rmv(v) + ridge * v  # noqa: E731
    return fn(matvec, b, rmatvec=rmatvec, **opts)


def relative_residual(matvec, x, b, ridge=0.0):
    """||(A + ridge I) x - b|| / ||b|| per system, shape [B]."""
    r = matvec(x) + ridge * x - b
    return r.norm(dim=-1) / b.norm(dim=-1).clamp_min(torch.finfo(b.dtype).tiny)
