"""Geometry solvers: metric fields, exp/log maps by shooting, path-energy geodesics, implicit gradients."""
import pytest
import torch

import bilevel
from solvers.geodesic import distance, exp_map, exp_map_jacobian, geodesic_acceleration, interpolate, log_map
from solvers.metric import (NeuralMetric, bind, check_spd, euclidean, metric_params, poincare, poincare_distance,
                            sphere, sphere_distance)
from solvers.path_energy import curve_energy, geodesic_path

DT = torch.float64
FAST = 12  # RK4 steps where only self-consistency (round trips, gradients of the discrete map) is tested


def ball_points(n, d, radius, gen, tan=False):
    """n points at geodesic radius <= `radius` from the origin (Poincare: tanh(r/2); sphere: tan(r/2))."""
    u = torch.randn(n, d, generator=gen, dtype=DT)
    u = u / u.norm(dim=1, keepdim=True)
    r = radius * torch.rand(n, 1, generator=gen, dtype=DT)
    return (torch.tan if tan else torch.tanh)(r / 2) * u


def random_metric(d, seed=0, scale=0.6, hidden=8):
    torch.manual_seed(seed)
    m = NeuralMetric(d, hidden=hidden, init_identity=False).to(DT)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


@pytest.mark.parametrize("d", [2, 5, 10])
@pytest.mark.parametrize("name", ["poincare", "sphere"])
def test_distance_matches_closed_form(name, d):
    gen = torch.Generator().manual_seed(d)
    metric, exact, tan = (poincare, poincare_distance, False) if name == "poincare" else (sphere, sphere_distance, True)
    x, y = ball_points(6, d, 1.5, gen, tan), ball_points(6, d, 1.5, gen, tan)
    # one antipodal-through-the-origin pair at distance 3 exactly
    e = torch.zeros(d, dtype=DT)
    e[0] = (torch.tan if tan else torch.tanh)(torch.tensor(0.75, dtype=DT))
    x, y = torch.cat([x, e[None]]), torch.cat([y, -e[None]])
    ref = exact(x, y)
    assert float(ref.max()) == pytest.approx(3.0)
    dist, info = distance(metric, x, y, steps=48, return_info=True)  # RK4 error ~ steps^-4
    assert bool(info.converged.all()) and float(info.residual.max()) <= 1e-10
    assert float(((dist - ref).abs() / ref).max()) <= 1e-6


def test_poincare_near_boundary():
    """x close to the boundary (|x| = 0.987) and y up to distance 3 from it, further out still."""
    gen = torch.Generator().manual_seed(1)
    d = 3
    x = ball_points(6, d, 5.0, gen)
    x = x / x.norm(dim=1, keepdim=True) * torch.tanh(torch.tensor(2.5, dtype=DT) / 2)
    u = torch.randn(6, d, generator=gen, dtype=DT)
    lam = 2 / (1 - (x * x).sum(1, keepdim=True))
    v = u / u.norm(dim=1, keepdim=True) / lam * torch.linspace(0.5, 3.0, 6, dtype=DT)[:, None]
    with torch.no_grad():
        y = exp_map(poincare, x, v, steps=256)
    ref = poincare_distance(x, y)
    assert float(ref.max()) == pytest.approx(3.0, rel=1e-5)
    dist, info = distance(poincare, x, y, steps=64, return_info=True)
    assert bool(info.converged.all())
    assert float(((dist - ref).abs() / ref).max()) <= 1e-6


def test_acceleration_matches_christoffel_form():
    """x'' = -Gamma(v, v) with Christoffel symbols from the metric's full derivative (small d)."""
    m = random_metric(3)
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 3, generator=gen, dtype=DT), torch.randn(4, 3, generator=gen, dtype=DT)
    dA = torch.func.vmap(torch.func.jacfwd(m))(x)  # [B, i, j, l] = d_l A_ij
    Ainv = torch.linalg.inv(m(x))
    # Gamma^k_ij v^i v^j = 1/2 A^{kl} (2 d_i A_jl - d_l A_ij) v^i v^j
    inner = 2 * torch.einsum("bjli,bi,bj->bl", dA, v, v) - torch.einsum("bijl,bi,bj->bl", dA, v, v)
    ref = -0.5 * torch.einsum("bkl,bl->bk", Ainv, inner)
    assert torch.allclose(geodesic_acceleration(m, x, v), ref, atol=1e-12)


@pytest.mark.parametrize("conformal", ["euclidean", "poincare", "sphere"])
def test_fused_neural_rhs_equals_generic_and_gradchecks(conformal):
    """NeuralMetric.geodesic_rhs (closed form) against the generic JVP/VJP right-hand side, its forward
    tangent (used by the variational equations) likewise, bind keeps it, and float64 gradcheck."""
    torch.manual_seed(3)
    m = NeuralMetric(3, hidden=6, init_identity=False, conformal=conformal, scale=1.7).to(DT)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0.6)
    gen = torch.Generator().manual_seed(3)
    x, v = 0.25 * torch.randn(5, 3, generator=gen, dtype=DT), torch.randn(5, 3, generator=gen, dtype=DT)
    generic = lambda x_, v_: geodesic_acceleration(lambda z: m(z), x_, v_)  # noqa: E731 (no geodesic_rhs)
    fused = lambda x_, v_: geodesic_acceleration(m, x_, v_)  # noqa: E731
    tx, tv = torch.randn(5, 3, generator=gen, dtype=DT), torch.randn(5, 3, generator=gen, dtype=DT)
    with torch.no_grad():
        ref, a, a_bound = generic(x, v), fused(x, v), geodesic_acceleration(bind(m, metric_params(m)), x, v)
        t_ref = torch.func.jvp(generic, (x, v), (tx, tv))[1]
        t_fused = torch.func.jvp(fused, (x, v), (tx, tv))[1]
    scale = float(ref.abs().max())
    assert float((a - ref).abs().max()) <= 1e-12 * scale
    assert float((a_bound - ref).abs().max()) <= 1e-12 * scale
    assert float((t_fused - t_ref).abs().max()) <= 1e-12 * float(t_ref.abs().max())
    params = metric_params(m)

    def rhs(x_, v_, W1, Wo):
        return m.geodesic_rhs(x_, v_, {**params, "body.0.weight": W1, "out.weight": Wo})
    args = [t.detach().clone().requires_grad_() for t in (x[:2], v[:2], params["body.0.weight"],
                                                           params["out.weight"])]
    assert torch.autograd.gradcheck(rhs, args)


def test_exp_map_methods_and_jacobian():
    m = random_metric(2, seed=1)
    gen = torch.Generator().manual_seed(2)
    x, v = torch.randn(5, 2, generator=gen, dtype=DT), torch.randn(5, 2, generator=gen, dtype=DT)
    y_rk4 = exp_map(m, x, v, steps=64)
    y_dopri = exp_map(m, x, v, method="dopri5", rtol=1e-11, atol=1e-12)
    assert torch.allclose(y_rk4, y_dopri, atol=1e-8)
    y, J = exp_map_jacobian(m, x, v, steps=64)
    assert torch.allclose(y, y_rk4, atol=1e-12)
    vr = v.clone().requires_grad_()
    out = exp_map(m, x, vr, steps=64)
    J_ad = torch.stack([torch.autograd.grad(out[:, k].sum(), vr, retain_graph=True)[0] for k in range(2)], 1)
    assert torch.allclose(J, J_ad, atol=1e-9)
    assert torch.allclose(exp_map(euclidean, x, v), x + v, atol=1e-13)


def test_round_trips_neural_metric():
    m = random_metric(3, seed=3)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, generator=gen, dtype=DT), torch.randn(8, 3, generator=gen, dtype=DT)
    with torch.no_grad():
        v, info = log_map(m, x, y, steps=FAST, return_info=True)
        assert bool(info.converged.all())
        assert float((exp_map(m, x, v, steps=FAST) - y).abs().max()) <= 1e-10
        w = 0.7 * torch.randn(8, 3, generator=gen, dtype=DT)
        assert float((log_map(m, x, exp_map(m, x, w, steps=FAST), steps=FAST) - w).abs().max()) <= 1e-9
        # a warm start converges to the same root
        v2 = log_map(m, x, y, init=v + 0.05, steps=FAST)
        assert float((v2 - v).abs().max()) <= 1e-9


@pytest.mark.parametrize("solve", ["shooting", "dense"])
def test_distance_gradient_in_points(solve):
    m = random_metric(2, seed=4)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(3, 2, generator=gen, dtype=DT), torch.randn(3, 2, generator=gen, dtype=DT)
    w = torch.tensor([1.0, -0.5, 2.0], dtype=DT)

    def outer(th):
        return (w * distance(m, th["x"], th["y"], tol=1e-13, solve=solve, steps=FAST)).sum()

    res = bilevel.check_gradient(outer, {"x": x, "y": y}, eps=1e-5, rtol=1e-6, n_directions=4)
    assert res, res.max_rel_err


def test_distance_gradient_in_metric_parameters():
    m = random_metric(2, seed=5, hidden=4)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(3, 2, generator=gen, dtype=DT), torch.randn(3, 2, generator=gen, dtype=DT)
    params = list(metric_params(m).values())
    grads = torch.autograd.grad(distance(m, x, y, tol=1e-13, steps=FAST).sum(), params)
    eps = 1e-5
    for k in range(3):  # random directions in parameter space, central differences
        dirs = [torch.randn(p.shape, generator=gen, dtype=DT) for p in params]
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, u in zip(params, dirs):
                    p.add_(sign * eps * u)
                vals.append(distance(m, x, y, tol=1e-13, steps=FAST).sum())
                for p, u in zip(params, dirs):
                    p.sub_(sign * eps * u)
        numeric = (vals[0] - vals[1]) / (2 * eps)
        analytic = sum((g * u).sum() for g, u in zip(grads, dirs))
        assert float((analytic - numeric).abs()) <= 1e-6 * max(1.0, float(numeric.abs())), (k, analytic, numeric)


def test_poincare_gradient_matches_closed_form():
    gen = torch.Generator().manual_seed(6)
    x = ball_points(5, 3, 1.5, gen).requires_grad_()
    y = ball_points(5, 3, 1.5, gen).requires_grad_()
    gx, gy = torch.autograd.grad(distance(poincare, x, y).sum(), (x, y))
    rx, ry = torch.autograd.grad(poincare_distance(x, y).sum(), (x, y))
    assert torch.allclose(gx, rx, rtol=1e-5, atol=1e-6) and torch.allclose(gy, ry, rtol=1e-5, atol=1e-6)


def test_interpolate_poincare_midpoint():
    gen = torch.Generator().manual_seed(7)
    x, y = ball_points(4, 2, 1.5, gen), ball_points(4, 2, 1.5, gen)
    pts = interpolate(poincare, x, y, torch.tensor([0.0, 0.5, 1.0], dtype=DT))
    half = poincare_distance(x, y) / 2
    assert torch.allclose(pts[0], x, atol=1e-14) and torch.allclose(pts[2], y, atol=1e-9)
    assert torch.allclose(poincare_distance(x, pts[1]), half, rtol=1e-6)
    assert torch.allclose(poincare_distance(pts[1], y), half, rtol=1e-6)


def test_path_energy_agrees_with_shooting_and_envelope_gradient():
    m = random_metric(2, seed=8)
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(4, 2, generator=gen, dtype=DT), torch.randn(4, 2, generator=gen, dtype=DT)
    res = geodesic_path(m, x, y, n_nodes=33, max_iter=1000, tol=1e-7)
    assert bool(res.converged.all())
    with torch.no_grad():
        dist = distance(m, x, y, steps=64)
    assert torch.allclose(res.length, dist, rtol=1e-3)  # midpoint rule: O(1/T^2)
    assert torch.allclose(torch.sqrt(2 * res.energy), res.length, rtol=1e-5)  # constant speed
    # envelope theorem: d E*/d theta = partial derivative on the optimal path, checked by differences
    params = list(metric_params(m).values())
    grads = torch.autograd.grad(res.energy.sum(), params)
    dirs = [torch.randn(p.shape, generator=gen, dtype=DT) for p in params]
    eps, vals = 1e-5, []
    for sign in (1, -1):
        with torch.no_grad():
            for p, u in zip(params, dirs):
                p.add_(sign * eps * u)
            vals.append(geodesic_path(m, x, y, init=res.path, max_iter=1000, tol=1e-7).energy.sum())
            for p, u in zip(params, dirs):
                p.sub_(sign * eps * u)
    numeric = (vals[0] - vals[1]) / (2 * eps)
    analytic = sum((g * u).sum() for g, u in zip(grads, dirs))
    assert float((analytic - numeric).abs()) <= 1e-4 * max(1.0, float(numeric.abs()))
    # curve_energy of the straight line is the Euclidean energy for A = I
    line = torch.stack([x, (x + y) / 2, y], 1)
    assert torch.allclose(curve_energy(euclidean, line), 0.5 * ((y - x) ** 2).sum(1))


def test_identity_init_and_spd():
    m = NeuralMetric(4).to(DT)
    x = torch.randn(6, 4, dtype=DT)
    assert torch.allclose(m(x), torch.eye(4, dtype=DT).expand(6, 4, 4), atol=1e-14)
    y = torch.randn(6, 4, dtype=DT)
    assert torch.allclose(log_map(m, x, y), y - x, atol=1e-12)
    check_spd(random_metric(4)(x))


def test_bad_inputs():
    x = torch.zeros(3, 2, dtype=DT)
    y = torch.full((3, 2), 0.1, dtype=DT)
    with pytest.raises(ValueError, match="not positive definite"):
        distance(lambda p: -poincare(p), x, y)
    with pytest.raises(ValueError, match="NaN or inf"):
        distance(poincare, x, torch.tensor([[1.0, 0.0]] * 3, dtype=DT))  # on the boundary: A = inf
    with pytest.raises(ValueError, match="must match"):
        distance(poincare, x, y[:, :1])
    with pytest.raises(ValueError, match="x contains NaN"):
        distance(poincare, x.clone().fill_(float("nan")), y)
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        distance(poincare, x[0], y[0])
    with pytest.raises(ValueError, match="points of shape"):
        distance(NeuralMetric(3).to(DT), x, y)
    # x == y: distance 0 with a finite gradient (the metric and the points both get one)
    m = random_metric(2, seed=9)
    xs = torch.randn(2, 2, dtype=DT, requires_grad=True)
    dist = distance(m, xs, xs.detach().clone(), steps=FAST)
    assert torch.equal(dist, torch.zeros(2, dtype=DT))
    grads = torch.autograd.grad(dist.sum(), [xs, *metric_params(m).values()], allow_unused=True)
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)


def test_non_converged_pairs_are_reported():
    gen = torch.Generator().manual_seed(10)
    x, y = ball_points(3, 2, 1.5, gen), ball_points(3, 2, 1.5, gen)
    with pytest.warns(bilevel.ConvergenceWarning, match="3 of 3 pairs did not converge"):
        v, info = log_map(poincare, x, y, tol=1e-30, max_iter=2, steps=FAST, return_info=True)
    assert not bool(info.converged.any()) and bool((info.residual > 1e-30).all())
    with pytest.raises(bilevel.ImplicitDiffError, match="did not converge"):
        log_map(poincare, x, y, tol=1e-30, max_iter=2, steps=FAST, strict=True)


def test_bench_cli_json(capsys):
    import json

    from problems.cli import main
    main(["bench", "geodesic", "--metric", "poincare", "--dim", "2", "--pairs", "4", "--steps", "16", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"metric", "dim", "pairs", "max_rel_err", "median_rel_err", "converged_frac", "pairs_per_s",
                        "peer_max_rel_err", "peer_pairs_per_s"}
    assert out["converged_frac"] == 1.0 and out["max_rel_err"] < 1e-5 and out["peer_max_rel_err"] > 0


def test_block_tridiagonal_preconditioner_solves_the_frozen_metric_hessian():
    """H has diagonal blocks A_j + A_{j+1} and off-diagonal blocks -A_{j+1}; the factored solve is exact."""
    from solvers.path_energy import _block_tridiag_factor, _block_tridiag_solve
    g = torch.Generator().manual_seed(0)
    B, T, d = 3, 6, 2
    R = torch.randn(B, T, d, d, generator=g, dtype=torch.float64)
    A = R @ R.transpose(-1, -2) + torch.eye(d, dtype=torch.float64)
    n = T - 1
    H = torch.zeros(B, n * d, n * d, dtype=torch.float64)
    for j in range(n):
        H[:, j * d:(j + 1) * d, j * d:(j + 1) * d] = A[:, j] + A[:, j + 1]
        if j + 1 < n:
            H[:, j * d:(j + 1) * d, (j + 1) * d:(j + 2) * d] = -A[:, j + 1]
            H[:, (j + 1) * d:(j + 2) * d, j * d:(j + 1) * d] = -A[:, j + 1]
    rhs = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    s = _block_tridiag_solve(_block_tridiag_factor(A), rhs)
    torch.testing.assert_close(torch.einsum("bij,bj->bi", H, s.reshape(B, -1)), rhs.reshape(B, -1),
                               rtol=1e-12, atol=1e-12)



def test_path_preconditioner_survives_a_pivot_that_is_not_positive_definite():
    """Block-tridiagonal factors of H for two pairs, one with vanishing segment metrics (its pivots fail
    Cholesky, as an underflowing metric's do): no LinAlgError, that pair falls back to identity pivots,
    and the other pair's solve is exact."""
    from solvers.path_energy import _block_tridiag_factor, _block_tridiag_solve
    gen = torch.Generator().manual_seed(3)
    T, d = 5, 2
    B = torch.randn(T, d, d, generator=gen, dtype=DT)
    A = torch.stack([B @ B.transpose(-1, -2) + 0.1 * torch.eye(d, dtype=DT), torch.zeros(T, d, d, dtype=DT)])
    fac = _block_tridiag_factor(A)
    assert all(torch.equal(L[1], torch.eye(d, dtype=DT)) for L in fac[1])
    H = torch.zeros((T - 1) * d, (T - 1) * d, dtype=DT)  # dense H of pair 0
    for j in range(T - 1):
        H[j * d:(j + 1) * d, j * d:(j + 1) * d] = A[0, j] + A[0, j + 1]
        if j + 1 < T - 1:
            H[j * d:(j + 1) * d, (j + 1) * d:(j + 2) * d] = -A[0, j + 1]
            H[(j + 1) * d:(j + 2) * d, j * d:(j + 1) * d] = -A[0, j + 1]
    g = torch.randn(2, T - 1, d, generator=gen, dtype=DT)
    s = _block_tridiag_solve(fac, g)
    assert torch.allclose(H @ s[0].flatten(), g[0].flatten(), atol=1e-10)
    assert bool(torch.isfinite(s).all())
