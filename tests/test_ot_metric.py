"""Alignment score, the batched c-transform and its gradients, short learning runs (problems/ot_metric.py,
solvers/c_transform.py)."""
import pytest
import torch

import bilevel
from problems.ot_data import consecutive_pairs, make_dataset
from problems.ot_metric import (GRIDS, DirectionMetric, PathNet, _discrete_c_transform, alignment, cheap_direction,
                                fit_lagrangian, fit_scarvelis, gradient_gap, grid, segment_points, true_direction,
                                true_metric, warm_starts)
from solvers.c_transform import c_transform, lbfgs, optimality


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(n)


ROT = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("name", list(GRIDS))
def test_alignment_true_one_rotated_zero(name):
    G = true_metric(name)
    assert alignment(name, G) == pytest.approx(1.0, abs=1e-12)
    assert alignment(name, lambda x: ROT @ G(x) @ ROT.T) < 1e-6


def test_grid_and_directions():
    x = grid("mass_splitting")
    assert x.shape == (10000, 2) and float(x[:, 0].min()) == -2.5 and float(x[:, 1].max()) == 15.0
    v = true_direction("circle", torch.tensor([[2.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(v, torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    A = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert torch.allclose(cheap_direction(A).abs(), torch.tensor([0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="no ground-truth"):
        true_direction("spiral", x)


# ----------------------------------------------------------------------------- c-transform
def _quadratic_problem(B=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    L = 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    params = {"Q": (L + L.T) / 2, "b": torch.randn(d, generator=g, dtype=torch.float64)}

    def f(x, z, p):  # c(x, y) - g(y), c = 1/2 |x - y|^2, g(y) = 1/2 y^T Q y + b^T y
        return 0.5 * ((x - z) ** 2).sum(-1) - (0.5 * torch.einsum("bi,ij,bj->b", z, p["Q"], z) + z @ p["b"])

    return f, x, params


def _closed_form(x, p):
    """y* = (I - Q)^{-1} (x + b), g^c(x) = 1/2 |x - y*|^2 - g(y*)."""
    M = torch.eye(x.shape[1], dtype=x.dtype) - p["Q"]
    y = torch.linalg.solve(M, (x + p["b"]).T).T
    g = 0.5 * torch.einsum("bi,ij,bj->b", y, p["Q"], y) + y @ p["b"]
    return y, 0.5 * ((x - y) ** 2).sum(-1) - g


@pytest.mark.parametrize("backward", ["envelope", "implicit"])
def test_c_transform_matches_closed_form(backward):
    f, x, p = _quadratic_problem()
    res = c_transform(f, x, x.clone(), p, tol=1e-10, backward=backward)
    y, val = _closed_form(x, p)
    assert bool(res.converged.all()) and res.iterations < 30
    assert torch.allclose(res.z, y, atol=1e-9) and torch.allclose(res.value, val, atol=1e-12)
    assert float(optimality(f)(res.z.detach(), (x, p)).detach().abs().max()) < 1e-9


def test_c_transform_gradients_envelope_and_implicit_match_closed_form():
    f, x, p = _quadratic_problem(B=5)
    truth = torch.autograd.grad(_closed_form(x.requires_grad_(), p)[1].sum(), x)[0]
    for backward in ("envelope", "implicit"):
        xx = x.detach().requires_grad_()
        res = c_transform(f, xx, xx.detach().clone(), p, tol=1e-11, backward=backward)
        assert torch.allclose(torch.autograd.grad(res.value.sum(), xx)[0], truth, atol=1e-8)


def test_c_transform_implicit_gradcheck_float64():
    f, x, p = _quadratic_problem(B=4, d=2, seed=1)

    def minimiser(x, Q, b):
        res = c_transform(f, x, x.detach().clone(), {"Q": (Q + Q.T) / 2, "b": b}, tol=1e-12, backward="implicit")
        return res.z, res.value

    inputs = tuple(t.detach().clone().requires_grad_() for t in (x, p["Q"], p["b"]))
    assert torch.autograd.gradcheck(minimiser, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    check = bilevel.check_gradient(lambda th: minimiser(*th)[0].pow(2).sum(), inputs)
    assert bool(check), check


def test_lbfgs_reports_nonconvergence_and_bad_input():
    f, x, p = _quadratic_problem()
    res = c_transform(f, x, x.clone(), p, max_iter=2, tol=1e-12)
    assert not bool(res.converged.all()) and float(res.residual.max()) > 1e-12
    with pytest.raises(ValueError, match="z0 must be"):
        c_transform(f, x, x[:3], p)
    with pytest.raises(ValueError, match="backward"):
        c_transform(f, x, x, p, backward="unrolled")
    z, v, g, conv, it = lbfgs(lambda z: ((z ** 4).sum(-1), 4 * z ** 3), torch.ones(3, 2, dtype=torch.float64),
                              max_iter=200, tol=1e-6)
    assert bool(conv.all()) and float(z.abs().max()) < 0.02


# ----------------------------------------------------------------------------- short learning runs
def test_segment_points_stay_in_their_pair():
    P, N = 5, 7
    src = torch.arange(P, dtype=torch.float64)[:, None, None].expand(P, N, 2)
    dst = src + 0.5
    p = segment_points(src, dst, n_mix=3)
    assert p.shape == (P, 3 * N, 2)
    assert bool(((p - src[:, :1]) >= 0).all() and ((p - src[:, :1]) <= 0.5).all())


def test_scarvelis_short_run_raises_alignment():
    snaps = make_dataset("circle", 0, n_samples=40)[:, :13]   # half the circle, 40 samples
    torch.manual_seed(0)
    start = alignment("circle", fit_scarvelis(snaps, rounds=1, phi_epochs=0, r_epochs=0).metric, n=30)
    res = fit_scarvelis(snaps, rounds=1, phi_epochs=100, r_epochs=800, n_mix=1)
    assert alignment("circle", res.metric, n=30) > start + 0.15


def test_lagrangian_short_run_raises_alignment_and_gradients_agree():
    snaps = make_dataset("x_paths", 0, n_samples=24)[:, :5]
    res0 = fit_lagrangian(snaps, steps=0)
    start = alignment("x_paths", res0.metric, n=30)
    res = fit_lagrangian(snaps, steps=40, batch=12, n_nodes=4, inner_iter=20, lr_metric=1e-2)
    end = alignment("x_paths", res.metric, n=30)
    assert end > start + 0.1, (start, end)
    src, dst = consecutive_pairs(snaps)
    gap, residual = gradient_gap(res.extra["model"], src[:, :6], dst)
    assert residual < 1e-6 and gap < 1e-4


# ----------------------------------------------------------------------------- warm starts, amortised paths
def _small_model(P=3, n=5, n_nodes=5, seed=0):
    torch.manual_seed(seed)
    snaps = make_dataset("x_paths", seed, n_samples=12)[:, :3]
    res = fit_lagrangian(snaps, steps=3, batch=n, n_nodes=n_nodes, inner_iter=5)
    return res.extra["model"], *consecutive_pairs(snaps)


def test_path_net_starts_straight_and_is_differentiable():
    model, src, dst = _small_model()
    net = PathNet(model.metric.norm, 2, 6).double()
    x, y = src[0, :4], dst[0, :4]
    t = torch.linspace(0, 1, 6, dtype=torch.float64)[1:-1, None]
    straight = (x[:, None] + t * (y - x)[:, None]).flatten(1)
    assert torch.allclose(net(x, y), straight, atol=1e-15)
    torch.nn.init.normal_(net.net[-1].weight)
    assert torch.autograd.gradcheck(lambda a, b: net(a, b), (x.clone().requires_grad_(), y.clone().requires_grad_()))


@pytest.mark.parametrize("activation", ["tanh", "leaky_relu"])
def test_direction_metric_eigenvalues_and_gradcheck_float64(activation):
    torch.manual_seed(0)
    snaps = make_dataset("circle", 0, n_samples=10)[:, :4]
    metric = DirectionMetric(snaps, hidden=8, activation=activation).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    eig = torch.linalg.eigvalsh(metric(x))
    assert torch.allclose(eig, torch.tensor([0.1, 1.0], dtype=torch.float64).expand(5, 2))
    names, values = zip(*metric.named_parameters())
    f = lambda xx, *ps: torch.func.functional_call(metric, dict(zip(names, ps)), (xx,))
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), *[v.detach().clone().requires_grad_() for v in values]))
    with pytest.raises(ValueError, match="activation"):
        DirectionMetric(snaps, activation="relu6")


def test_zero_bias_init_gives_a_field_constant_along_rays_from_the_origin():
    """The published initialisation (zero biases, leaky ReLU, raw origin) makes u(a x) = u(x) for a > 0;
    PyTorch's uniform biases or a centred input do not."""
    torch.manual_seed(0)
    snaps = make_dataset("mass_splitting", 0, n_samples=10)[:, :4]
    x = torch.randn(50, 2, dtype=torch.float64)
    a = torch.rand(50, 1, dtype=torch.float64) * 5 + 0.1

    def ray_gap(**kw):
        metric = DirectionMetric(snaps, hidden=16, activation="leaky_relu", **kw).double()
        with torch.no_grad():
            return float((metric.direction(a * x) - metric.direction(x)).abs().max())

    assert ray_gap(init="zero_bias", centre=False) < 1e-12
    assert ray_gap(init="torch", centre=False) > 1e-3
    assert ray_gap(init="zero_bias", centre=True) > 1e-3      # mass splitting's mean is far from the origin
    metric = DirectionMetric(snaps, hidden=16, init="zero_bias", centre=False)
    assert all(not layer.bias.detach().any() for layer in metric.net[::2])
    assert float(metric.norm.center.abs().max()) == 0
    with pytest.raises(ValueError, match="init"):
        DirectionMetric(snaps, init="xavier")


def test_discrete_c_transform_is_the_argmin_over_targets():
    model, src, dst = _small_model()
    x = src[:, :4]
    y = _discrete_c_transform(model, x, dst)
    g = (model.metric.norm.scale ** 2 * model.potential(model.metric.norm(dst)).squeeze(-1))
    for p in range(x.shape[0]):          # brute force, one pair and one source at a time
        for i in range(x.shape[1]):
            D = dst[p] - x[p, i]
            A = model.metric(0.5 * (dst[p] + x[p, i]))
            vals = 0.5 * torch.einsum("mi,mij,mj->m", D, A, D) - g[p]
            assert torch.equal(y[p, i], dst[p, int(vals.argmin())])


def test_warm_starts_keep_the_best_candidate():
    model, src, dst = _small_model()
    P, n, d = src.shape[0], 4, 2
    x = src[:, :n]
    prev = torch.randn(P, n, d * (model.n_nodes - 1), dtype=torch.float64) * 0.3 + x.repeat(1, 1, model.n_nodes - 1)
    prev[:, 0] = float("nan")        # no previous path for the first sample
    f = model.objective(P)
    value = lambda z: f(x.reshape(-1, d), z.reshape(P * n, -1), model.params()).detach()
    best = value(warm_starts(model, x, dst, prev))
    for one in ("previous", "amortised", "discrete"):
        assert bool((best <= value(warm_starts(model, x, dst, prev, (one,))) + 1e-12).all())
    assert torch.isfinite(best).all()
    with pytest.raises(ValueError, match="candidates"):
        warm_starts(model, x, dst, prev, ())


def test_box_wall_adds_the_squared_distance_and_is_differentiable():
    model, src, dst = _small_model()
    P, n, d = src.shape[0], 3, 2
    x = src[:, :n].reshape(-1, d)
    free = model.objective(P)
    model.box = torch.tensor([[-0.5, -0.5], [0.5, 0.5]], dtype=torch.float64)
    walled = model.objective(P)
    z = torch.randn(P * n, d * (model.n_nodes - 1), dtype=torch.float64)
    y = z[:, :d]
    outside = (y - y.clamp(-0.5, 0.5)).pow(2).sum(-1)
    assert bool((outside > 0).any()) and bool((outside == 0).any())
    p = model.params()
    assert torch.allclose(walled(x, z, p) - free(x, z, p), 0.5 * 10.0 * outside, atol=1e-12)
    assert torch.autograd.gradcheck(lambda zz: walled(x, zz, p), (z.requires_grad_(),))
