"""Differentiable decision layers, batched over instances (leading dim B).

- Top-k: ``hard_topk`` (test time) and ``soft_topk``, the entropic optimal transport of the
  n scores onto two anchors ("out", "in") with masses (n-k)/n and k/n (Xie et al. 2020).
- Budget allocation: maximise sum_j 1 - prod_i (1 - z_i Y_ij) on the capped simplex
  {0 <= z <= 1, sum z = k} by projected gradient ascent, differentiated through the fixed point
  z = Proj(z + eta grad).
- Portfolio: max p^T x - gamma x^T Sigma x on the simplex, by an accelerated projected gradient
  solver in torch (same fixed-point differentiation) or by cvxpylayers.

Every layer checks its inputs and its solve and raises DecisionError naming the instance.
"""
import torch

import bilevel


class DecisionError(RuntimeError):
    """A decision problem is infeasible, has bad input, or its solver failed."""


def _check(name, t, dim):
    if t.dim() != dim:
        raise DecisionError(f"{name} must have {dim} dims (leading batch dim), got shape {tuple(t.shape)}")
    bad = ~torch.isfinite(t).reshape(t.shape[0], -1).all(-1)
    if bool(bad.any()):
        raise DecisionError(f"{name} of instance {int(bad.nonzero()[0])} contains NaN or inf")


def _fail(what, err, tol):
    i = int(err.argmax())
    raise DecisionError(f"{what} did not converge for instance {i}: residual {float(err[i]):.3g} > tol {tol:.3g}")


# ----------------------------------------------------------------------------- top-k
def hard_topk(scores, k):
    """[B, n] -> [B, n] 0/1 indicator of the k largest scores."""
    _check("scores", scores, 2)
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores).scatter_(-1, idx, 1.0)


def _topk_threshold(s, k, eps, iters=200):
    """tau [B, 1] with sum_i sigmoid((s_i - tau)/eps) = k, by bisection (no grad)."""
    lo = s.amin(-1, keepdim=True) - 50 * eps
    hi = s.amax(-1, keepdim=True) + 50 * eps
    for _ in range(iters):
        mid = (lo + hi) / 2
        big = torch.sigmoid((s - mid) / eps).sum(-1, keepdim=True) > k
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    return (lo + hi) / 2


def soft_topk(scores, k, eps=0.1):
    """Soft top-k membership [B, n] in (0, 1), summing to k, differentiable in scores [B, n].

    Entropic OT (regularisation eps) of the uniform mass on the n scores onto two anchors with
    masses (n-k)/n ("out") and k/n ("in"), cost 0 to "out" and -s_i to "in"; returns n times the
    plan's "in" column. With two anchors the Sinkhorn fixed point is closed form up to one dual
    variable: z_i = sigmoid((s_i - tau)/eps) with sum_i z_i = k. tau is found by bisection and
    differentiated by the engine through that condition (batched 1x1 systems).
    eps: a float or a per-instance tensor [B, 1] (treated as a constant).
    """
    _check("scores", scores, 2)
    n = scores.shape[-1]
    if not 0 < k < n:
        raise DecisionError(f"soft_topk needs 0 < k < n, got k={k}, n={n}")
    if torch.is_tensor(eps):
        eps = eps.detach()
    with torch.no_grad():
        tau = _topk_threshold(scores.detach(), k, eps)

    def F(t, s):
        return torch.sigmoid((s - t) / eps).sum(-1, keepdim=True) - k

    tau = bilevel.implicit_root(F, tau, scores, batched=True, solve="dense",
                                residual_tol=1e-4 * k, strict=True)
    return torch.sigmoid((scores - tau) / eps)


# ----------------------------------------------------------------------------- capped simplex
def project_capped_simplex(v, k, cap=1.0):
    """Euclidean projection of v [B, n] onto {0 <= z <= cap, sum z = k}, differentiable in v.

    The shift tau solves h(tau) = sum_i clamp(v_i - tau, 0, cap) = k; h is piecewise linear with
    breakpoints v_i - cap and v_i and slope -(number of free coordinates), so one sort and a
    cumulative sum give h at every breakpoint and tau exactly (no grad). Then, on the found
    active set, tau = (sum_free v - (k - cap * n_upper)) / n_free in closed form, which autograd
    differentiates.
    """
    n = v.shape[-1]
    if not 0 < k <= n * cap:
        raise DecisionError(f"capped simplex {{0 <= z <= {cap}, sum z = {k}}} in R^{n} is empty")
    with torch.no_grad():
        vd = v.detach()
        bp, order = torch.cat([vd - cap, vd], -1).sort(-1)  # [B, 2n]
        kind = torch.cat([torch.ones_like(vd), -torch.ones_like(vd)], -1).gather(-1, order)
        n_free = kind.cumsum(-1)[..., :-1]  # free coordinates between consecutive breakpoints
        drop = (bp.diff(dim=-1) * n_free).cumsum(-1)
        h = n * cap - torch.cat([torch.zeros_like(drop[..., :1]), drop], -1)  # h at the breakpoints
        j = ((h >= k).sum(-1, keepdim=True) - 1).clamp(0, 2 * n - 2)
        b0, b1 = bp.gather(-1, j), bp.gather(-1, j + 1)
        h0, h1 = h.gather(-1, j), h.gather(-1, j + 1)
        den = h0 - h1
        tau0 = torch.where(den > 0, b0 + (h0 - k) * (b1 - b0) / torch.where(den > 0, den, 1), b0)
        w = vd - tau0
        free = (w > 0) & (w < cap)
        upper = w >= cap
    n_free = free.sum(-1, keepdim=True)
    tau = ((v * free).sum(-1, keepdim=True) - (k - cap * upper.sum(-1, keepdim=True))) / n_free.clamp_min(1)
    tau = torch.where(n_free > 0, tau, tau0)
    return torch.where(free, v - tau, w.clamp(0, cap))


def _pga(grad, z, k, step, max_iter, tol, cap=1.0):
    """Accelerated projected gradient ascent with adaptive restart, batched; returns z and the
    fixed-point residual max|z - Proj(z + step grad(z))| per instance."""
    y, t = z, torch.ones_like(z[:, :1])
    for it in range(max_iter):
        z_new = project_capped_simplex(y + step * grad(y), k, cap)
        t_new = (1 + (1 + 4 * t * t).sqrt()) / 2
        restart = ((z_new - y) * (z_new - z)).sum(-1, keepdim=True) < 0  # step against the ascent: restart
        t_new = torch.where(restart, torch.ones_like(t_new), t_new)
        y = torch.where(restart, z_new, z_new + (t - 1) / t_new * (z_new - z))
        z, t = z_new, t_new
        if it % 20 == 19:
            res = (z - project_capped_simplex(z + step * grad(z), k, cap)).abs().amax(-1)
            if bool((res <= tol).all()):
                return z, res
    res = (z - project_capped_simplex(z + step * grad(z), k, cap)).abs().amax(-1)
    return z, res


def _default_tol(dtype):
    return 1e-9 if dtype == torch.float64 else 1e-5


# ----------------------------------------------------------------------------- budget allocation
def budget_objective(Y, z):
    """sum_j 1 - prod_i (1 - z_i Y_ij): Y [B, m, t], z [B, m] -> [B]."""
    return (1 - (1 - z.unsqueeze(-1) * Y).prod(-2)).sum(-1)


def budget_grad(Y, z):
    """d budget_objective / dz [B, m], with exclusive products (no division)."""
    p = 1 - z.unsqueeze(-1) * Y  # [B, m, t]
    ones = torch.ones_like(p[:, :1])
    before = torch.cat([ones, p[:, :-1]], 1).cumprod(1)
    after = torch.cat([p[:, 1:], ones], 1).flip(1).cumprod(1).flip(1)
    return (Y * before * after).sum(-1)


def budget_allocation(Y, budget=2.0, *, reg=0.0, step=0.1, max_iter=2000, tol=None, ridge=0.0, z0=None):
    """Differentiable budget allocation: argmax_z budget_objective(Y, z) - reg/2 |z|^2 on
    {0 <= z <= 1, sum z = budget}. Y [B, m, t] -> z [B, m].

    The objective is multilinear, not concave, and its maximisers are often vertices, where the
    decision is piecewise constant in Y (zero gradient); reg > 0 smooths it (a training-time
    layer, as Wilder et al. 2019 regularise their relaxations). The solver returns a stationary
    point reached from z0 (default uniform). The gradient comes from the fixed point
    z = Proj(z + step grad) (batched dense solves; ridge damps degenerate stationary points).
    Raises DecisionError when the ascent does not reach tol.
    """
    _check("Y", Y, 3)
    B, m, _ = Y.shape
    tol = _default_tol(Y.dtype) if tol is None else tol
    if z0 is None:
        z0 = torch.full((B, m), budget / m, dtype=Y.dtype, device=Y.device)
    with torch.no_grad():
        Yd = Y.detach()
        z, res = _pga(lambda z: budget_grad(Yd, z) - reg * z, z0, budget, step, max_iter, tol)
    if bool((res > tol).any()):
        _fail("budget allocation ascent", res, tol)

    def T(z, Y):
        return project_capped_simplex(z + step * (budget_grad(Y, z) - reg * z), budget)

    return bilevel.implicit_fixed_point(T, z, Y, batched=True, solve="dense", ridge=ridge,
                                        residual_tol=10 * tol)


# ----------------------------------------------------------------------------- portfolio QP
def portfolio_objective(p, x, Sigma, gamma=0.1):
    """p^T x - gamma x^T Sigma x: p, x [B, n], Sigma [B, n, n] -> [B]."""
    return (p * x).sum(-1) - gamma * (x.unsqueeze(-2) @ Sigma @ x.unsqueeze(-1))[..., 0, 0]


def _check_spd(Sigma):
    _check("Sigma", Sigma, 3)
    _, info = torch.linalg.cholesky_ex(Sigma.detach())
    if bool((info > 0).any()):
        raise DecisionError(f"Sigma of instance {int((info > 0).nonzero()[0])} is not positive definite")


def portfolio_qp(p, Sigma, gamma=0.1, *, max_iter=5000, tol=None):
    """argmax_x p^T x - gamma x^T Sigma x on {x >= 0, sum x = 1}, batched in torch.

    p [B, n], Sigma [B, n, n] symmetric positive definite -> x [B, n], differentiable in p and
    Sigma through the fixed point x = Proj(x + step (p - 2 gamma Sigma x)), step = 1/L.
    """
    _check("p", p, 2)
    _check_spd(Sigma)
    tol = _default_tol(p.dtype) if tol is None else tol
    B, n = p.shape
    with torch.no_grad():
        L = 2 * gamma * torch.linalg.eigvalsh(Sigma.detach())[:, -1:]  # [B, 1] Lipschitz constant
        step = 1 / L
        pd, Sd = p.detach(), Sigma.detach()
        x0 = torch.full((B, n), 1.0 / n, dtype=p.dtype, device=p.device)
        x, res = _pga(lambda x: (pd - 2 * gamma * (Sd @ x.unsqueeze(-1))[..., 0]) / L, x0, 1.0, 1.0,
                      max_iter, tol)
    if bool((res > tol).any()):
        _fail("portfolio QP", res, tol)

    def T(x, th):
        g = th["p"] - 2 * gamma * (th["Sigma"] @ x.unsqueeze(-1))[..., 0]
        return project_capped_simplex(x + step * g, 1.0)

    return bilevel.implicit_fixed_point(T, x, {"p": p, "Sigma": Sigma}, batched=True, solve="dense",
                                        residual_tol=10 * tol)


_LAYERS = {}


def _cvxpy_layer(n, gamma):
    if (n, gamma) not in _LAYERS:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer
        x = cp.Variable(n)
        p = cp.Parameter(n)
        L = cp.Parameter((n, n))
        prob = cp.Problem(cp.Maximize(p @ x - gamma * cp.sum_squares(L @ x)), [x >= 0, cp.sum(x) == 1])
        _LAYERS[n, gamma] = CvxpyLayer(prob, parameters=[p, L], variables=[x],
                                       solver_args={"solve_method": "Clarabel", "tol_gap_abs": 1e-10,
                                                    "tol_gap_rel": 1e-10, "tol_feas": 1e-10})
    return _LAYERS[n, gamma]


def portfolio_qp_cvxpylayers(p, Sigma, gamma=0.1, *, feas_tol=1e-5):
    """The same QP as :func:`portfolio_qp` through cvxpylayers (conic solver, diffcp backward).

    Sigma is passed as its Cholesky factor L^T (x^T Sigma x = |L^T x|^2). Raises DecisionError when
    the solver fails or returns an infeasible point.
    """
    _check("p", p, 2)
    _check_spd(Sigma)
    Lt = torch.linalg.cholesky(Sigma).transpose(-1, -2)
    try:
        (x,) = _cvxpy_layer(p.shape[-1], gamma)(p, Lt)
    except Exception as e:  # diffcp/cvxpy raise their own SolverError types
        raise DecisionError(f"cvxpylayers portfolio solve failed for a batch of {p.shape[0]} instances: {e}") from e
    viol = torch.maximum((-x.detach()).clamp_min(0).amax(-1), (x.detach().sum(-1) - 1).abs())
    if not bool(torch.isfinite(viol).all()) or bool((viol > feas_tol).any()):
        v = torch.nan_to_num(viol, nan=float("inf"))
        _fail("cvxpylayers portfolio QP (infeasible output)", v, feas_tol)
    return x
