"""The implicit-gradient engine against closed forms, finite differences and torchopt."""
import warnings

import pytest
import torch

import bilevel
from bilevel import BackwardSolveError, ConvergenceWarning, ImplicitDiffError

D = torch.float64


def ridge_data(n=60, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)


def ridge_F(X, y):
    def inner(w, lam):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam * w * w).sum()
    return torch.func.grad(inner)


@pytest.mark.parametrize("solve", ["dense", "cg", "normal_cg", "gmres", "bicgstab"])
def test_ridge_hypergradient_matches_closed_form(solve):
    X, y = ridge_data()
    n, d = X.shape
    lam = torch.linspace(0.1, 2.0, d, dtype=D, requires_grad=True)
    A = X.T @ X / n + torch.diag(lam.detach())
    w = torch.linalg.solve(A, X.T @ y / n)
    w_star = bilevel.implicit_root(ridge_F(X, y), w, lam, solve=solve)
    target = torch.arange(d, dtype=D)
    (g,) = torch.autograd.grad(((w_star - target) ** 2).sum(), lam)
    # closed form: w = A^{-1} b, dL/dlam_j = -(A^{-1} dL/dw)_j w_j
    u = torch.linalg.solve(A, 2 * (w - target))
    closed = -u * w
    assert ((g - closed).norm() / closed.norm()).item() <= 1e-8


def test_neumann_on_well_conditioned_ridge():
    X, y = ridge_data()
    lam = torch.full((6,), 0.5, dtype=D, requires_grad=True)
    w = torch.linalg.solve(X.T @ X / 60 + torch.diag(lam.detach()), X.T @ y / 60)
    ref = bilevel.implicit_root(ridge_F(X, y), w, lam, solve="dense")
    neu = bilevel.implicit_root(ridge_F(X, y), w, lam, solve="neumann", alpha=0.5, maxiter=2000)
    g1, = torch.autograd.grad(ref.sum(), lam)
    g2, = torch.autograd.grad(neu.sum(), lam)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


def logistic_problem(n=80, d=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=D)
    y = (torch.rand(n, generator=g, dtype=D) < torch.sigmoid(X @ torch.ones(d, dtype=D))).to(D)
    Xv, yv = X[: n // 2], y[: n // 2]

    def inner(w, log_lam):
        return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + 0.5 * (log_lam.exp() * w * w).sum()

    F = torch.func.grad(inner)

    def solve_inner(log_lam):
        w = torch.zeros(d, dtype=D)
        for _ in range(30):  # Newton, to machine precision
            H = torch.func.hessian(inner)(w, log_lam)
            w = w - torch.linalg.solve(H, F(w, log_lam))
        return w

    def outer(log_lam):
        w = bilevel.implicit_root(F, solve_inner(log_lam.detach()), log_lam, solve="cg")
        return torch.nn.functional.binary_cross_entropy_with_logits(Xv @ w, yv)

    return outer, d


def test_logistic_per_feature_l2_against_finite_differences():
    outer, d = logistic_problem()
    log_lam = torch.linspace(-2, 0, d, dtype=D)
    res = bilevel.check_gradient(outer, log_lam, eps=1e-6, rtol=1e-6)
    assert res, (res.analytic, res.numeric)
    assert res.max_rel_err < 1e-6


def test_check_gradient_detects_a_wrong_gradient():
    def outer(t):
        return WrongGrad.apply(t).sum()

    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t ** 2

        @staticmethod
        def backward(ctx, g):
            return g  # wrong: should be 2 t g
    assert not bilevel.check_gradient(outer, torch.tensor([1.5, -0.5], dtype=D))


def fixed_point_map(z, theta):
    """Contraction z = 0.5 tanh(W z) + theta, elementwise batched."""
    return 0.5 * torch.tanh(theta["W"] @ z.unsqueeze(-1)).squeeze(-1) + theta["b"]


def test_fixed_point_against_finite_differences():
    g = torch.Generator().manual_seed(3)
    W = 0.5 * torch.randn(3, 3, generator=g, dtype=D)
    b = torch.randn(3, generator=g, dtype=D)

    def outer(theta):
        with torch.no_grad():
            z = torch.zeros(3, dtype=D)
            for _ in range(200):
                z = fixed_point_map(z, theta)
        z = bilevel.implicit_fixed_point(fixed_point_map, z, theta, solve="neumann", maxiter=500)
        return (z ** 3).sum()

    assert bilevel.check_gradient(outer, {"W": W, "b": b}, rtol=1e-6)


def test_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(4)
    B = 7
    W = (0.4 * torch.randn(3, 3, generator=g, dtype=D)).requires_grad_()
    b = torch.randn(B, 3, generator=g, dtype=D).requires_grad_()

    def solve(theta, z):
        with torch.no_grad():
            for _ in range(200):
                z = fixed_point_map(z, theta)
        return z

    theta = {"W": W, "b": b}
    outs = {}
    for method in ["dense", "gmres", "bicgstab", "neumann"]:
        z = bilevel.implicit_fixed_point(fixed_point_map, solve(theta, torch.zeros(B, 3, dtype=D)), theta,
                                         batched=True, solve=method)
        outs[method] = torch.autograd.grad((z ** 2).sum(), [W, b])
    gW = torch.zeros_like(W)
    gb = []
    for i in range(B):
        th = {"W": W, "b": b[i]}
        z = bilevel.implicit_fixed_point(fixed_point_map, solve(th, torch.zeros(3, dtype=D)), th, solve="dense")
        a, c = torch.autograd.grad((z ** 2).sum(), [W, b])
        gW += a
        gb.append(c[i])
    for method, (aW, ab) in outs.items():
        torch.testing.assert_close(aW, gW, rtol=1e-8, atol=1e-10, msg=method)
        torch.testing.assert_close(ab, torch.stack(gb), rtol=1e-8, atol=1e-10, msg=method)


def test_modes_agree_on_a_converged_problem():
    X, y = ridge_data()
    F = ridge_F(X, y)
    lam = torch.full((6,), 0.7, dtype=D, requires_grad=True)
    step = lambda w, lam: w - 0.5 * F(w, lam)  # noqa: E731
    grads = {}
    for mode, k in [("implicit", None), ("unrolled", None), ("truncated", 150)]:
        w = bilevel.iterate(step, torch.zeros(6, dtype=D), lam, 300, backward=mode, k=k, optimality=F,
                            solve="cg")
        grads[mode], = torch.autograd.grad((w ** 2).sum(), lam)
    torch.testing.assert_close(grads["unrolled"], grads["implicit"], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(grads["truncated"], grads["implicit"], rtol=1e-6, atol=1e-10)


def test_truncated_zero_steps_gives_no_gradient_path():
    lam = torch.ones(2, dtype=D, requires_grad=True)
    w = bilevel.iterate(lambda w, lam: 0.5 * w + lam, torch.zeros(2, dtype=D), lam, 5,
                        backward="truncated", k=0)
    assert not w.requires_grad


def test_custom_root_decorator_and_model_parameters_as_dict():
    """The inner variable is a whole (functional) model: a dict of tensors."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, 3, generator=g, dtype=D)
    y = torch.randn(40, generator=g, dtype=D)
    model = torch.nn.Linear(3, 1).double()

    def inner(params, theta):
        pred = torch.func.functional_call(model, params, (X,)).squeeze(-1)
        return (theta.exp() * (pred - y) ** 2).mean() + 1e-2 * sum((p ** 2).sum() for p in params.values())

    F = torch.func.grad(inner)

    @bilevel.custom_root(F, solve="cg")
    def fit(params, theta):
        for _ in range(3000):
            g = F(params, theta)
            params = {k: v - 0.3 * g[k] for k, v in params.items()}
            if max(float(t.abs().max()) for t in g.values()) < 1e-12:
                break
        return params

    init = {k: torch.zeros_like(v) for k, v in model.named_parameters()}

    def outer(theta):
        p = fit(init, theta)
        return (p["weight"] ** 2).sum() + p["bias"].sum()

    res = bilevel.check_gradient(outer, torch.linspace(-1, 1, 40, dtype=D), n_directions=6, rtol=1e-5)
    assert res, res


def test_scalar_inner_problem_has_nonzero_correct_gradient():
    """z* = argmin (z - theta)^2 / 2 + z^4 / 4: a scalar root. torchopt issue #222 returns zero here."""
    F = lambda z, t: z - t + z ** 3  # noqa: E731
    t = torch.tensor(0.8, dtype=D, requires_grad=True)
    z = torch.tensor(0.0, dtype=D)
    for _ in range(50):
        z = z - F(z, t.detach()) / (1 + 3 * z ** 2)
    zs = bilevel.implicit_root(F, z, t)
    (g,) = torch.autograd.grad(zs, t)
    assert abs(g.item() - 1 / (1 + 3 * z.item() ** 2)) < 1e-12


def test_agrees_with_torchopt_custom_root_on_ridge():
    torchopt = pytest.importorskip("torchopt")
    X, y = ridge_data()
    F = ridge_F(X, y)
    lam0 = torch.linspace(0.1, 2.0, 6, dtype=D)

    def closed(lam):
        return torch.linalg.solve(X.T @ X / 60 + torch.diag(lam), X.T @ y / 60)

    @torchopt.diff.implicit.custom_root(lambda w, lam: F(w, lam), argnums=1,
                                        solve=torchopt.linear_solve.solve_cg(maxiter=100, atol=1e-14))
    def torchopt_solver(w, lam):
        return closed(lam.detach())

    lam1 = lam0.clone().requires_grad_()
    g1, = torch.autograd.grad(torchopt_solver(torch.zeros(6, dtype=D), lam1).sum(), lam1)
    lam2 = lam0.clone().requires_grad_()
    g2, = torch.autograd.grad(bilevel.implicit_root(F, closed(lam0), lam2, solve="cg").sum(), lam2)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- bad input
def test_mismatched_shapes_are_an_error():
    lam = torch.ones(3, dtype=D, requires_grad=True)
    with pytest.raises(ImplicitDiffError, match="shaped like z"):
        bilevel.implicit_root(lambda z, t: z[:2] - t[:2], torch.zeros(3, dtype=D), lam)


@pytest.mark.parametrize("where", ["z", "theta"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_inputs_are_an_error(where, bad):
    z = torch.zeros(3, dtype=D)
    lam = torch.ones(3, dtype=D, requires_grad=True)
    if where == "z":
        z[1] = bad
    else:
        lam = lam.detach().clone()
        lam[2] = bad
        lam.requires_grad_()
    with pytest.raises(ImplicitDiffError, match=f"{where} leaf 0 .*(NaN|inf)"):
        bilevel.implicit_root(lambda z, t: z - t, z, lam)


def test_singular_backward_system_is_an_error():
    # F(z, t) = (z0 + z1 - t, 2 z0 + 2 z1 - 2 t): dF/dz singular at every point.
    F = lambda z, t: torch.stack([z[0] + z[1] - t, 2 * (z[0] + z[1] - t)])  # noqa: E731
    t = torch.tensor(1.0, dtype=D, requires_grad=True)
    z = torch.tensor([0.5, 0.5], dtype=D)
    with pytest.raises(BackwardSolveError, match="singular or ill-conditioned"):
        torch.autograd.grad(bilevel.implicit_root(F, z, t, solve="dense").sum(), t)
    # Krylov solvers see a singular system when it is inconsistent: (dF/dz)^T u = (1, 0) has no solution.
    for method in ["gmres", "bicgstab", "cg"]:
        with pytest.raises(BackwardSolveError, match="singular or ill-conditioned"):
            torch.autograd.grad(bilevel.implicit_root(F, z, t, solve=method)[0], t)


def test_ill_conditioned_backward_system_is_an_error():
    F = lambda z, t: torch.stack([z[0] - t, 1e-17 * z[1]])  # noqa: E731
    t = torch.tensor(1.0, dtype=D, requires_grad=True)
    z = torch.tensor([1.0, 0.0], dtype=D)
    with pytest.raises(BackwardSolveError, match="condition number"):
        torch.autograd.grad(bilevel.implicit_root(F, z, t, solve="dense").sum(), t)
    # ridge damping makes it solvable
    g, = torch.autograd.grad(bilevel.implicit_root(F, z, t, solve="dense", ridge=1e-3).sum(), t)
    assert torch.isfinite(g)


def test_unconverged_inner_solution_warns_with_its_residual_or_raises_when_strict():
    F = lambda z, t: z - t  # noqa: E731
    t = torch.ones(2, dtype=D, requires_grad=True)
    z = torch.tensor([1.0, 1.3], dtype=D)
    with pytest.warns(ConvergenceWarning, match=r"inner residual .* = 0\.3"):
        bilevel.implicit_root(F, z, t)
    with pytest.raises(ImplicitDiffError, match="inner residual"):
        bilevel.implicit_root(F, z, t, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bilevel.implicit_root(F, torch.ones(2, dtype=D), t)


def test_backward_iteration_cap_warns():
    X, y = ridge_data()
    lam = torch.full((6,), 1e-3, dtype=D, requires_grad=True)
    w = torch.linalg.solve(X.T @ X / 60 + torch.diag(lam.detach()), X.T @ y / 60)
    z = bilevel.implicit_root(ridge_F(X, y), w, lam, solve="cg", maxiter=2)
    with pytest.warns(ConvergenceWarning, match="backward linear solve stopped"):
        torch.autograd.grad(z.sum(), lam)


def test_batched_needs_a_common_leading_dimension():
    with pytest.raises(ValueError, match="leading batch dimension"):
        bilevel.implicit_root(lambda z, t: z, {"a": torch.zeros(3, 2, dtype=D), "b": torch.zeros(4, dtype=D)},
                              torch.ones(1, dtype=D), batched=True)
