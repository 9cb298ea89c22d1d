"""Snapshot benchmarks and user snapshot files (problems/ot_data.py)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from problems.ot_data import (DATASETS, check_snapshots, consecutive_pairs, get_dataset, load_snapshots,
                              make_dataset)

REF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ot_snapshots"
SHAPES = {"circle": (1, 25, 100, 2), "mass_splitting": (1, 10, 100, 2), "x_paths": (2, 10, 100, 2)}


@pytest.mark.parametrize("name", DATASETS)
def test_shapes_seeding(name):
    a, b, c = make_dataset(name, 0), make_dataset(name, 0), make_dataset(name, 1)
    assert a.shape == SHAPES[name] and a.dtype == torch.float64
    assert torch.equal(a, b) and not torch.equal(a, c)
    if name == "circle":
        assert torch.equal(a[0, 0], a[0, -1])  # closed loop


@pytest.mark.parametrize("name", DATASETS)
def test_statistics_match_published_files(name):
    path = REF / f"{name}.npy"
    if not path.exists():
        pytest.skip("reference snapshots (../shared/data/ot_snapshots) not present")
    ref = np.load(path).reshape(-1, 100, 2)
    ours = make_dataset(name, 0).numpy().reshape(-1, 100, 2)
    assert ours.shape == ref.shape
    sd = np.sqrt(np.stack([np.trace(np.cov(r.T)) / 2 for r in ref]))
    # per-time means agree to half a standard deviation of the snapshot (the standard error of the
    # difference of two 100-sample means is 0.14 sd; the timing fit leaves a little more)
    assert (np.abs(ours.mean(1) - ref.mean(1)).max(1) / sd).max() < 0.5
    # per-time covariances: same total spread within a factor 2.5 and the same principal axis where
    # the spread is anisotropic
    tr_o = np.stack([np.trace(np.cov(r.T)) for r in ours])
    tr_r = np.stack([np.trace(np.cov(r.T)) for r in ref])
    assert np.all(tr_o / tr_r < 2.5) and np.all(tr_o / tr_r > 0.4)
    for o, r in zip(ours, ref):
        wr, vr = np.linalg.eigh(np.cov(r.T))
        if wr[1] > 4 * wr[0]:
            assert abs(vr[:, 1] @ np.linalg.eigh(np.cov(o.T))[1][:, 1]) > 0.95


def test_a_wrong_statistic_would_fail():
    """The comparison above can fail: a time-reversed mass splitting is far from the file."""
    path = REF / "mass_splitting.npy"
    if not path.exists():
        pytest.skip("reference snapshots not present")
    ref = np.load(path)[:, :, :].reshape(-1, 100, 2)
    rev = make_dataset("mass_splitting", 0).numpy()[0, ::-1]
    sd = np.sqrt(np.stack([np.trace(np.cov(r.T)) / 2 for r in ref]))
    assert (np.abs(rev.mean(1) - ref.mean(1)).max(1) / sd).max() > 0.5


def test_pairs():
    s = make_dataset("x_paths", 0, n_samples=7)
    src, dst = consecutive_pairs(s)
    assert src.shape == (18, 7, 2) and torch.equal(src[9], s[1, 0]) and torch.equal(dst[9], s[1, 1])


def test_load_user_files(tmp_path):
    arr = np.random.default_rng(0).normal(size=(3, 20, 2))
    np.save(tmp_path / "a.npy", arr)
    np.savez(tmp_path / "b.npz", snapshots=arr, other=arr[0])
    name, s = get_dataset(str(tmp_path / "a.npy"))
    assert name == "a" and s.shape == (1, 3, 20, 2) and np.allclose(s[0].numpy(), arr)
    assert load_snapshots(tmp_path / "b.npz").shape == (1, 3, 20, 2)


@pytest.mark.parametrize("arr, msg", [
    (np.zeros((20, 2)), "shape"),
    (np.zeros((1, 20, 2)), "at least 2 time points"),
    (np.zeros((3, 1, 2)), "at least 2 samples"),
    (np.where(np.arange(120).reshape(3, 20, 2) == 61, np.nan, 1.0), "NaN or inf at trajectory 0, time 1, sample 10"),
])
def test_bad_snapshots(tmp_path, arr, msg):
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(ValueError, match=msg):
        load_snapshots(tmp_path / "bad.npy")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_snapshots(tmp_path / "missing.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros((3, 4, 2)), b=np.zeros((3, 4, 2)))
    with pytest.raises(ValueError, match="name the array 'snapshots'"):
        load_snapshots(tmp_path / "two.npz")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match=".npy or .npz"):
        load_snapshots(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="numeric"):
        check_snapshots(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset("spiral")
