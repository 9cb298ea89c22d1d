"""Decision layers (vs finite differences, POT, cvxpylayers), the DQ score, TaskMet's implicit
gradient vs unrolling, and the `bilevel taskmet` command."""
import json

import numpy as np
import pytest
import torch

import bilevel
from solvers import decision_layers as dl
from solvers.model_fit import fit

D = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- top-k
def test_soft_topk_is_the_entropic_ot_plan_of_pot():
    ot = pytest.importorskip("ot")
    s = torch.randn(3, 12, generator=gen(), dtype=D)
    z = dl.soft_topk(s, 3, eps=0.5)
    torch.testing.assert_close(z.sum(-1), torch.full((3,), 3.0, dtype=D))
    for b in range(3):
        M = np.stack([np.zeros(12), -s[b].numpy()], 1)
        plan = ot.sinkhorn(np.full(12, 1 / 12), np.array([9 / 12, 3 / 12]), M, 0.5, numItermax=20000,
                           stopThr=1e-13)
        np.testing.assert_allclose(12 * plan[:, 1], z[b].numpy(), atol=1e-9)


def test_soft_topk_gradient_vs_finite_differences_and_limit():
    s = torch.randn(4, 10, generator=gen(1), dtype=D)
    w = torch.randn(4, 10, generator=gen(2), dtype=D)
    eps = torch.tensor([[0.3], [0.5], [1.0], [0.2]], dtype=D)
    assert bilevel.check_gradient(lambda s: (dl.soft_topk(s, 2, eps) * w).sum(), s)
    # small eps -> hard top-k
    torch.testing.assert_close(dl.soft_topk(s, 2, 1e-4), dl.hard_topk(s, 2), atol=1e-6, rtol=0)


def test_hard_topk_and_bad_input():
    s = torch.tensor([[0.1, 3.0, -1.0, 2.0]], dtype=D)
    assert dl.hard_topk(s, 2).tolist() == [[0.0, 1.0, 0.0, 1.0]]
    with pytest.raises(dl.DecisionError, match="k=4"):
        dl.soft_topk(s, 4)
    bad = torch.zeros(3, 4, dtype=D)
    bad[2, 1] = float("nan")
    with pytest.raises(dl.DecisionError, match="instance 2"):
        dl.soft_topk(bad, 1)


# ----------------------------------------------------------------------------- projection
@pytest.mark.parametrize("k,cap", [(2.0, 1.0), (1.0, 1.0), (1.0, 0.3), (6.0, 1.0)])
def test_capped_simplex_projection_vs_bisection(k, cap):
    v = 2 * torch.randn(500, 7, generator=gen(3), dtype=D)
    z = dl.project_capped_simplex(v, k, cap)
    lo, hi = v.amin(-1, keepdim=True) - cap, v.amax(-1, keepdim=True)
    for _ in range(200):
        mid = (lo + hi) / 2
        big = (v - mid).clamp(0, cap).sum(-1, keepdim=True) > k
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    torch.testing.assert_close(z, (v - (lo + hi) / 2).clamp(0, cap), atol=1e-7, rtol=0)
    torch.testing.assert_close(z.sum(-1), torch.full((500,), k, dtype=D))


def test_capped_simplex_projection_gradient_and_empty_set():
    v = torch.randn(3, 6, generator=gen(4), dtype=D)
    assert torch.autograd.gradcheck(lambda v: dl.project_capped_simplex(v, 2.0), (v.requires_grad_(),))
    with pytest.raises(dl.DecisionError, match="empty"):
        dl.project_capped_simplex(v, 7.0)


# ----------------------------------------------------------------------------- budget
def budget_instance(B=5, seed=5):
    return torch.rand(B, 5, 10, generator=gen(seed), dtype=D)


def test_budget_allocation_is_stationary_and_beats_uniform():
    Y = budget_instance()
    z = dl.budget_allocation(Y, 2.0)
    torch.testing.assert_close(z.sum(-1), torch.full((5,), 2.0, dtype=D))
    assert bool(((z >= -1e-12) & (z <= 1 + 1e-12)).all())
    fixed = dl.project_capped_simplex(z + 0.1 * dl.budget_grad(Y, z), 2.0)
    assert float((fixed - z).abs().max()) < 1e-8
    uniform = torch.full_like(z, 0.4)
    assert bool((dl.budget_objective(Y, z) >= dl.budget_objective(Y, uniform)).all())
    # the analytic gradient of the objective
    zz = torch.rand(5, 5, generator=gen(6), dtype=D).requires_grad_()
    (g,) = torch.autograd.grad(dl.budget_objective(Y, zz).sum(), zz)
    torch.testing.assert_close(dl.budget_grad(Y, zz.detach()), g)


def test_budget_allocation_gradient_vs_finite_differences():
    Y = budget_instance(4)
    w = torch.randn(4, 5, generator=gen(7), dtype=D)
    z = dl.budget_allocation(Y, 2.0, reg=2.0)
    assert bool(((z > 1e-6) & (z < 1 - 1e-6)).sum(-1).ge(2).all())  # interior: a nonzero gradient
    res = bilevel.check_gradient(lambda Y: (dl.budget_allocation(Y, 2.0, reg=2.0) * w).sum(), Y,
                                 n_directions=8, rtol=1e-5)
    assert res, res.max_rel_err
    assert float(res.analytic.abs().max()) > 1e-3


def test_budget_allocation_errors_name_the_instance():
    Y = budget_instance(3)
    Y[1, 2, 3] = float("inf")
    with pytest.raises(dl.DecisionError, match="instance 1"):
        dl.budget_allocation(Y)
    with pytest.raises(dl.DecisionError, match="empty"):
        dl.budget_allocation(budget_instance(2), budget=6.0)
    with pytest.raises(dl.DecisionError, match="did not converge for instance"):
        dl.budget_allocation(budget_instance(2), max_iter=1, tol=1e-14)


# ----------------------------------------------------------------------------- portfolio
def portfolio_instance(B=4, n=8, seed=8):
    g = gen(seed)
    p = 0.5 * torch.randn(B, n, generator=g, dtype=D)
    A = torch.randn(B, n, n, generator=g, dtype=D)
    return p, A @ A.transpose(-1, -2) / n + 0.1 * torch.eye(n, dtype=D)


def test_portfolio_qp_matches_cvxpylayers_solution_and_gradient():
    p, S = portfolio_instance()
    w = torch.randn(p.shape, generator=gen(9), dtype=D)
    grads = []
    for layer in (dl.portfolio_qp, dl.portfolio_qp_cvxpylayers):
        pp, SS = p.clone().requires_grad_(), S.clone().requires_grad_()
        x = layer(pp, SS, 0.1)
        grads.append((x, *torch.autograd.grad((x * w).sum(), (pp, SS))))
    (x1, gp1, gS1), (x2, gp2, gS2) = grads
    torch.testing.assert_close(x1, x2, atol=1e-5, rtol=0)
    torch.testing.assert_close(gp1, gp2, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(gS1 + gS1.transpose(-1, -2), gS2 + gS2.transpose(-1, -2), atol=1e-4, rtol=1e-3)


def test_portfolio_qp_gradient_vs_finite_differences():
    p, S = portfolio_instance(3, 6, seed=10)
    w = torch.randn(p.shape, generator=gen(11), dtype=D)
    res = bilevel.check_gradient(lambda th: (dl.portfolio_qp(th["p"], th["S"], 0.1) * w).sum(),
                                 {"p": p, "S": S}, n_directions=8, rtol=1e-5)
    assert res, res.max_rel_err


def test_portfolio_rejects_non_spd_covariance():
    p, S = portfolio_instance(3)
    S[2] = -S[2]
    for layer in (dl.portfolio_qp, dl.portfolio_qp_cvxpylayers):
        with pytest.raises(dl.DecisionError, match="instance 2 is not positive definite"):
            layer(p, S)


# ----------------------------------------------------------------------------- score
@pytest.mark.parametrize("problem", ["cubic", "budget"])
def test_dq_true_labels_one_random_labels_zero(problem):
    from problems.taskmet.data import PROBLEMS
    from problems.taskmet.score import decision_quality
    task = PROBLEMS[problem](0, n_test=200)
    y = task.Y["test"]
    assert decision_quality(task, y, "test") == pytest.approx(1.0, abs=1e-12)
    g = gen(123)
    dqs = [decision_quality(task, torch.rand(y.shape, generator=g, dtype=D), "test") for _ in range(5)]
    assert abs(float(np.mean(dqs))) < 0.1
    assert decision_quality(task, -y, "test") < -0.5  # anti-decisions are worse than random


# ----------------------------------------------------------------------------- LODL
def test_lodl_recovers_a_diagonal_quadratic_regret():
    """Regret exactly sum_j v_j (yhat_j - y_j)^2: the fitted surrogate c (diag(w) + L L^T) / s^2
    must be diag(v) (the diagonal part by exact least squares, nothing left for L)."""
    from types import SimpleNamespace

    from problems.taskmet.methods import fit_lodl, lodl_loss
    g = gen(14)
    Y = torch.rand(5, 6, 1, generator=g, dtype=D)
    v = torch.rand(5, 6, generator=g, dtype=D) + 0.1

    def objective(y, z, a):  # y, z [5 * k, 6, 1], instance-major as fit_lodl repeats them
        return -(v.repeat_interleave(len(z) // 5, 0) * (z - y)[..., 0] ** 2).sum(-1)

    task = SimpleNamespace(Y={"train": Y}, aux={"train": None}, decide_test=lambda y, a: y,
                           objective=objective)
    w, L, c, s = fit_lodl(task, n_samples=64, rank=3, steps=50, noise=0.5, seed=0)
    torch.testing.assert_close(c[:, None] * w / s ** 2, v, rtol=1e-6, atol=1e-10)
    yhat = Y + 0.1 * torch.randn(Y.shape, generator=g, dtype=D)
    exact = float((v * (yhat - Y)[..., 0] ** 2).sum(-1).mean())
    assert lodl_loss(yhat, Y, w, L, c, s) == pytest.approx(exact, rel=1e-2)  # L fits a zero residual


# ----------------------------------------------------------------------------- TaskMet gradient
def small_taskmet(wd=0.0):
    """Cubic-like: 6 instances x 8 items, linear model, scalar metric weight from a tiny MLP;
    the inner loss has TaskMet's weight decay wd/2 |theta|^2 (a ridge regression)."""
    from problems.taskmet.methods import l2
    g = gen(12)
    X = 2 * torch.rand(6, 8, 1, generator=g, dtype=D) - 1
    Y = 10 * (X ** 3 - 0.65 * X)
    net = torch.nn.Linear(1, 1).double()
    metric = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    phi = {k: v.detach() for k, v in metric.named_parameters()}

    def loss(params, phi):
        r = torch.func.functional_call(net, params, (X,)) - Y
        w = torch.nn.functional.softplus(torch.func.functional_call(metric, phi, (X,)))
        return (w * r * r).mean() + wd / 2 * l2(params)

    def start(phi, backward):  # unrolled: from zero; implicit: warm start at the weighted LS solution
        if backward == "unrolled":
            return {"weight": torch.zeros(1, 1, dtype=D), "bias": torch.zeros(1, dtype=D)}
        with torch.no_grad():
            w = torch.nn.functional.softplus(torch.func.functional_call(metric, phi, (X,))).reshape(-1)
            A = torch.cat([X.reshape(-1, 1), torch.ones(w.numel(), 1, dtype=D)], 1)
            n = w.numel()  # minimiser of sum w r^2 / n + wd/2 |theta|^2
            sol = torch.linalg.solve(A.T @ (w[:, None] * A) + n * wd / 2 * torch.eye(2, dtype=D),
                                     A.T @ (w * Y.reshape(-1)))
        return {"weight": sol[:1].reshape(1, 1), "bias": sol[1:]}

    def outer(phi, backward):
        steps, lr = (0, 0.0) if backward == "implicit" else (1500, 0.2)
        p = fit(loss, start(phi, backward), phi, steps=steps, lr=lr, backward=backward, tol=1e-12,
                residual_tol=1e-8)
        yhat = torch.func.functional_call(net, p, (X,))
        return -(Y[..., 0] * dl.soft_topk(yhat[..., 0], 1, 2.0)).sum(-1).mean()

    return phi, outer


@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_taskmet_implicit_gradient_matches_unrolled_and_finite_differences(wd):
    phi, outer = small_taskmet(wd)
    grads = {}
    for mode in ("implicit", "unrolled"):
        th = {k: v.clone().requires_grad_() for k, v in phi.items()}
        g = torch.autograd.grad(outer(th, mode), list(th.values()))
        grads[mode] = torch.cat([t.reshape(-1) for t in g])
    assert float(grads["implicit"].norm()) > 1e-4
    torch.testing.assert_close(grads["implicit"], grads["unrolled"], rtol=1e-6, atol=1e-9)
    res = bilevel.check_gradient(lambda th: outer(th, "implicit"), phi, eps=1e-5, rtol=1e-5, n_directions=4)
    assert res, res.max_rel_err


def test_taskmet_training_loop_runs_and_selects():
    from problems.taskmet.data import cubic
    from problems.taskmet.methods import run
    task = cubic(1, n_train=40, n_test=40)
    settings = {"taskmet": {"outer_steps": 4, "inner_init": 50, "inner_steps": 20, "metric_hidden": 8,
                            "eval_every": 2}}
    out, net, params, extra = run(task, "taskmet", None, 1, settings)
    assert out["best_step"] in (0, 2, 4) and np.isfinite(out["dq"]) and np.isfinite(out["mse"])
    # step 0 (the fit under the initial metric) is a candidate: with a frozen metric and no refits
    # every checkpoint ties and the first offered is kept
    frozen = {"taskmet": {**settings["taskmet"], "metric_lr": 0.0, "inner_steps": 0, "wd": 1e-3}}
    assert run(task, "taskmet", None, 1, frozen)[0]["best_step"] == 0


# ----------------------------------------------------------------------------- CLI
def test_cli_taskmet_json(tmp_path, monkeypatch, capsys):
    from problems.cli import main
    monkeypatch.setenv("BILEVEL_RESULTS", str(tmp_path))
    monkeypatch.setenv("BILEVEL_QUIET", "1")
    main(["taskmet", "--problem", "cubic", "--method", "dfl", "--alpha", "10", "--wd", "0", "--quick",
          "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"problem", "method", "alpha", "dq", "mse", "seconds", "data"} <= set(out)
    assert out["problem"] == "cubic" and out["alpha"] == 10.0 and out["data"].startswith("synthetic")
    assert list(tmp_path.glob("taskmet-cubic-dfl-*/result.json"))
