"""Geodesic motion skills: demonstrations, pullback metric, VAE uncertainty, geodesic motion, CLI errors."""
import numpy as np
import pytest
import torch

from problems.motion import (MotionVAE, clearance, dist_to_data, fit_vae, geodesic_motion, motion_metric,
                             resample)
from problems.motion_cli import parse_obstacle
from problems.motion_data import FAMILIES, check_demos, get_demos, load_demos, make_demos
from solvers.pullback import ObstacleMetric, PullbackMetric, magnification_factor

D64 = torch.float64


# ---------------------------------------------------------------- demonstrations
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_families_are_seeded_smooth_and_finite(name):
    a, b, c = make_demos(name, seed=1), make_demos(name, seed=1), make_demos(name, seed=2)
    assert a.ndim == 3 and a.shape[-1] in (2, 3) and np.isfinite(a).all()
    assert np.array_equal(a, b) and not np.allclose(a, c)
    step = np.linalg.norm(np.diff(a, axis=1), axis=-1)
    assert step.max() < 10 * np.median(step)          # no jumps: a smooth curve plus small noise


def test_user_files_roundtrip(tmp_path):
    demos = make_demos("helix", n_demos=3, n_time=20)
    np.save(tmp_path / "d.npy", demos)
    np.savez(tmp_path / "d.npz", demos=demos, other=np.zeros(2))
    np.savez(tmp_path / "one.npz", demos)
    for f in ("d.npy", "d.npz", "one.npz"):
        assert np.array_equal(load_demos(tmp_path / f), demos)
    assert get_demos(str(tmp_path / "d.npy"))[0] == "d"


@pytest.mark.parametrize("arr, msg", [
    (np.zeros((5, 2)), "shape \\[demo, time, dim\\]"),
    (np.zeros((2, 1, 2)), "at least 2 time steps"),
    (np.zeros((2, 5, 4)), "dim must be 2 or 3"),
    (np.array([[["a", "b"]] * 3]), "expected numbers"),
])
def test_bad_demonstrations_are_named(arr, msg):
    with pytest.raises(ValueError, match=msg):
        check_demos(arr)


def test_nan_is_located(tmp_path):
    demos = make_demos("s_shape", n_demos=2, n_time=10)
    demos[1, 4, 0] = np.nan
    np.save(tmp_path / "nan.npy", demos)
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 4, 0\)"):
        load_demos(tmp_path / "nan.npy")


def test_bad_files_are_named(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 5, 2)), b=np.zeros(3))
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(ValueError, match="name the array 'demos'"):
        load_demos(tmp_path / "two.npz")
    with pytest.raises(ValueError, match=".npy or .npz"):
        load_demos(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError):
        load_demos(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="neither a built-in family"):
        get_demos("no_such_family")
    with pytest.raises(ValueError, match="unknown demonstration family"):
        make_demos("no_such_family")


# ---------------------------------------------------------------- pullback metric
def _linear(seed=0, D=3, d=2):
    g = torch.Generator().manual_seed(seed)
    W, V = torch.randn(D, d, generator=g, dtype=D64), torch.randn(D, d, generator=g, dtype=D64)
    b = torch.randn(D, generator=g, dtype=D64)
    return W, V, b


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_linear_decoder_metric_is_constant_WtW(mode):
    W, V, b = _linear()
    z = torch.randn(4, 5, 2, dtype=D64)
    M = PullbackMetric(lambda z: W @ z + b, mode=mode)(z)
    assert M.shape == (4, 5, 2, 2)
    torch.testing.assert_close(M, (W.T @ W).expand(4, 5, 2, 2))
    M2 = PullbackMetric(lambda z: (W @ z + b, V @ z), mode=mode)(z)          # (mu, sigma) decoder
    torch.testing.assert_close(M2, (W.T @ W + V.T @ V).expand(4, 5, 2, 2))


def test_geodesic_of_linear_decoder_is_a_straight_line():
    from solvers.geodesic import geodesic_acceleration
    from solvers.path_energy import geodesic_path

    W, _, b = _linear(1)
    metric = PullbackMetric(lambda z: W @ z + b)
    x, y = torch.randn(3, 2, dtype=D64), torch.randn(3, 2, dtype=D64)
    t = torch.linspace(0, 1, 17, dtype=D64)[None, :, None]
    line = (1 - t) * x[:, None] + t * y[:, None]
    bent = line + 0.5 * torch.sin(torch.pi * t) * torch.tensor([1.0, -1.0], dtype=D64)  # start far from it
    res = geodesic_path(metric, x, y, n_nodes=17, init=bent, max_iter=1000)
    assert bool(res.converged.all())
    torch.testing.assert_close(res.path, line, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.length, ((y - x) @ W.T).norm(dim=-1))
    acc = geodesic_acceleration(metric, x, torch.randn(3, 2, dtype=D64))
    torch.testing.assert_close(acc, torch.zeros_like(acc), atol=1e-10, rtol=0)


def _tiny_vae(seed=0, D=2):
    torch.manual_seed(seed)
    vae = MotionVAE(D, hidden=8, n_centers=5).double()
    with torch.no_grad():
        vae.centers.copy_(torch.randn(5, 2, dtype=D64))
        vae.lam.uniform_(0.5, 2.0)
        vae.log_w.normal_()
        vae.floor_radius.fill_(2.0)
    return vae.requires_grad_(True)


def test_pullback_metric_gradcheck_in_z_and_parameters():
    vae = _tiny_vae()
    metric = PullbackMetric(vae)
    z = torch.randn(3, 2, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(metric, (z,))
    params = {k: v.detach().clone().requires_grad_() for k, v in vae.named_parameters()
              if k in ("mean_net.0.weight", "log_w")}

    def of_params(w0, lw):
        return torch.func.functional_call(metric, {"decoder.mean_net.0.weight": w0, "decoder.log_w": lw}, (z.detach(),))
    assert torch.autograd.gradcheck(of_params, (params["mean_net.0.weight"], params["log_w"]))


def test_obstacle_metric_scales_inside_and_gradcheck():
    vae = _tiny_vae(1)
    base = PullbackMetric(vae)
    z = torch.randn(6, 2, dtype=D64)
    x = vae.decoder_mean(z).detach()
    inside = ObstacleMetric(base, vae.decoder_mean, x[:1], [1e-3], strength=100.0)  # ball at z[0]'s image
    A, M = inside(z), base(z)
    torch.testing.assert_close(A[0], 101.0 * M[0], rtol=1e-6, atol=0)
    far = (x[1:] - x[0]).norm(dim=-1) > 1e-2
    torch.testing.assert_close(A[1:][far], M[1:][far])
    zz = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(ObstacleMetric(base, vae.decoder_mean, x[:1], [0.3], strength=10.0), (zz,))
    with pytest.raises(ValueError, match="positive radii"):
        ObstacleMetric(base, vae.decoder_mean, x[:1], [-1.0])
    with pytest.raises(ValueError, match="finite"):
        base(torch.tensor([[float("nan"), 0.0]], dtype=D64))


# ---------------------------------------------------------------- trained VAE and geodesic motion
@pytest.fixture(scope="module")
def trained():
    demos = make_demos("c_shape", n_demos=4, n_time=60, seed=0)
    torch.set_num_threads(1)
    vae = fit_vae(demos, steps=800, precision_steps=500, hidden=32, n_centers=24, seed=0).double()
    return demos, vae


def test_magnification_factor_is_larger_off_the_data(trained):
    demos, vae = trained
    metric = motion_metric(vae)
    z_data = vae.encode(torch.as_tensor(demos, dtype=D64).reshape(-1, 2))[0]
    lo, hi = z_data.amin(0) - 1.0, z_data.amax(0) + 1.0
    axes = [torch.linspace(float(lo[k]), float(hi[k]), 40, dtype=D64) for k in range(2)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    off = grid[torch.cdist(grid, z_data).amin(1) > 0.3]               # latent points away from all codes
    mf_on, mf_off = magnification_factor(metric, z_data), magnification_factor(metric, off)
    assert len(off) > 100
    assert mf_off.median() > 10 * mf_on.median()
    sigma_on, sigma_off = vae.decoder_std(z_data), vae.decoder_std(off)
    assert sigma_off.median() > 10 * sigma_on.median()                # the std grows away from the data


def test_geodesic_motion_follows_data_and_avoids_obstacle(trained):
    demos, vae = trained
    start, goal = demos[:, 0].mean(0), demos[:, -1].mean(0)
    ball = ((0.5 * (start + goal)).tolist(), 0.2 * float(np.linalg.norm(goal - start)))
    out = geodesic_motion(vae, start, goal, [ball], n_nodes=24, n_grid=40, max_iter=60)
    line = resample(torch.as_tensor(np.stack([start, goal])), 100)
    assert clearance(out["motion"], *ball) > 0 > clearance(line, *ball)
    assert dist_to_data(out["motion"], demos) < 0.5 * dist_to_data(line, demos)
    assert dist_to_data(out["motion"], demos) < 0.5 * dist_to_data(out["line_motion"], demos)
    torch.testing.assert_close(out["motion"][0], torch.as_tensor(start), atol=0.1, rtol=0)


def test_resample_is_equispaced_in_arc_length():
    curve = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 3.0]], dtype=D64)
    r = resample(curve, 5)
    torch.testing.assert_close(r, torch.tensor([[0, 0], [1, 0], [1, 1], [1, 2], [1, 3]], dtype=D64))


# ---------------------------------------------------------------- command line
def test_obstacle_parsing():
    assert parse_obstacle("1,2,0.5", 2) == ([1.0, 2.0], 0.5)
    assert parse_obstacle("none", 3) is None
    for bad in ("1,2", "1,2,-1", "a,b,c"):
        with pytest.raises(ValueError, match="--obstacle"):
            parse_obstacle(bad, 2)


def test_cli_reports_bad_demonstration_file(tmp_path, monkeypatch):
    from problems.cli import main

    monkeypatch.setenv("BILEVEL_RESULTS", str(tmp_path))
    bad = np.zeros((3, 10, 2))
    bad[0, 0, 0] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(SystemExit, match="non-finite"):
        main(["motion", "--demos", str(tmp_path / "bad.npy"), "--seed", "0"])
