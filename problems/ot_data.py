"""Population snapshots for metric learning from optimal transport (DESIGN.md section 5).

Snapshots are float64 tensors [K, T, N, d]: K independent trajectories (populations), T times,
N samples per time. The three benchmarks follow the published construction (Scarvelis & Solomon,
ICLR 2023): Gaussian end populations, a random pairing of start and end samples, and each sample
moved along a path that is cheap under the ground-truth metric, observed at equally spaced times:
- circle: 4 arcs between Gaussians (std 0.1) at the quadrant points of the unit circle, 6 times per
  arc, 24 snapshots plus the first again (closed loop) -> [1, 25, N, 2]; paths go around the circle
  (angle and radius interpolated).
- mass_splitting: N(0, 0.1^2 I) to an even mix of N((1, +-1), 0.1^2 I), 10 times, scaled x10 ->
  [1, 10, N, 2]; straight paths.
- x_paths: (-1,-1) -> (1,1) and (-1,1) -> (1,-1), std 0.1, 10 times each -> [2, 10, N, 2].
The published files were made with 100 Adam steps on a velocity field per path, not converged
geodesics, so their samples do not move at constant speed; the timing s(t) = a t + (1 - a) t^2 of
each benchmark (a = 1.088 / 0.328 / 1.264) is the least-squares fit to the per-time means of those
files, which makes our per-time means and covariances match theirs (tests/test_ot_data.py).
"""
import math
from pathlib import Path

import numpy as np
import torch

from .arrays import load_array

DATASETS = ("circle", "mass_splitting", "x_paths")
_TIMING = {"circle": 1.088, "mass_splitting": 0.328, "x_paths": 1.264}


def _timing(name, n_times, dtype):
    t = torch.linspace(0, 1, n_times, dtype=dtype)
    a = _TIMING[name]
    return a * t + (1 - a) * t * t


def _straight(x0, x1, s):
    """x0, x1 [N, d], s [T] -> [T, N, d] on the segments."""
    return x0 + s[:, None, None] * (x1 - x0)


def _circle(gen, n, dtype):
    s = _timing("circle", 7, dtype)[:-1]  # 6 times per arc, the arc's end is the next arc's start
    arcs = []
    for i in range(4):
        th0, th1 = i * math.pi / 2, (i + 1) * math.pi / 2
        x0 = torch.tensor([math.cos(th0), math.sin(th0)], dtype=dtype) + 0.1 * torch.randn(n, 2, generator=gen, dtype=dtype)
        x1 = torch.tensor([math.cos(th1), math.sin(th1)], dtype=dtype) + 0.1 * torch.randn(n, 2, generator=gen, dtype=dtype)
        r0, r1 = x0.norm(dim=1), x1.norm(dim=1)
        a0 = torch.atan2(x0[:, 1], x0[:, 0])
        da = torch.remainder(torch.atan2(x1[:, 1], x1[:, 0]) - a0 + math.pi, 2 * math.pi) - math.pi
        da = torch.where(da < 0, da + 2 * math.pi, da)  # counter-clockwise, about pi / 2
        r = r0 + s[:, None] * (r1 - r0)
        ang = a0 + s[:, None] * da
        arcs.append(torch.stack([r * torch.cos(ang), r * torch.sin(ang)], -1))
    snaps = torch.cat(arcs, 0)
    return torch.cat([snaps, snaps[:1]], 0)[None]


def _mass_splitting(gen, n, dtype):
    x0 = 0.1 * torch.randn(n, 2, generator=gen, dtype=dtype)
    sign = torch.ones(n, dtype=dtype)
    sign[n // 2:] = -1
    sign = sign[torch.randperm(n, generator=gen)]
    x1 = torch.stack([torch.ones(n, dtype=dtype), sign], 1) + 0.1 * torch.randn(n, 2, generator=gen, dtype=dtype)
    return 10 * _straight(x0, x1, _timing("mass_splitting", 10, dtype))[None]


def _x_paths(gen, n, dtype):
    s = _timing("x_paths", 10, dtype)
    out = []
    for start, end in (((-1.0, -1.0), (1.0, 1.0)), ((-1.0, 1.0), (1.0, -1.0))):
        x0 = torch.tensor(start, dtype=dtype) + 0.1 * torch.randn(n, 2, generator=gen, dtype=dtype)
        x1 = torch.tensor(end, dtype=dtype) + 0.1 * torch.randn(n, 2, generator=gen, dtype=dtype)
        out.append(_straight(x0, x1, s))
    return torch.stack(out)


_MAKERS = {"circle": _circle, "mass_splitting": _mass_splitting, "x_paths": _x_paths}


def make_dataset(name, seed=0, n_samples=100, dtype=torch.float64):
    """Generate a benchmark -> snapshots [K, T, n_samples, 2] (seeded, reproducible)."""
    if name not in _MAKERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS} or pass a .npy/.npz path")
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2, got {n_samples}")
    gen = torch.Generator().manual_seed(int(seed))
    return _MAKERS[name](gen, n_samples, dtype)


def check_snapshots(data, where="snapshots"):
    """Validate and convert an array [T, N, d] or [K, T, N, d] -> float64 tensor [K, T, N, d]."""
    arr = np.asarray(data)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{where}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"{where}: expected shape [time, sample, dim] (or [trajectory, time, sample, dim]), "
                         f"got shape {tuple(np.shape(data))}")
    K, T, N, d = arr.shape
    if T < 2:
        raise ValueError(f"{where}: need at least 2 time points to learn from transport, got {T}")
    if N < 2 or d < 1:
        raise ValueError(f"{where}: need at least 2 samples per time and dim >= 1, got shape {tuple(arr.shape)}")
    bad = ~np.isfinite(arr)
    if bad.any():
        k, t, i, _ = np.argwhere(bad)[0]
        raise ValueError(f"{where}: NaN or inf at trajectory {k}, time {t}, sample {i}")
    return torch.as_tensor(arr, dtype=torch.float64)


def load_snapshots(path):
    """Load user snapshots from .npy (one array) or .npz (key 'snapshots', else its only array)."""
    return check_snapshots(load_array(path, "snapshots", "snapshot file"), where=str(path))


def get_dataset(spec, seed=0, n_samples=100):
    """A benchmark name or a file path -> (name, snapshots [K, T, N, d])."""
    if spec in _MAKERS:
        return spec, make_dataset(spec, seed, n_samples)
    return Path(spec).stem, load_snapshots(spec)


def consecutive_pairs(snaps):
    """[K, T, N, d] -> (source [P, N, d], target [P, N, d]) for all K (T - 1) consecutive pairs."""
    return snaps[:, :-1].flatten(0, 1), snaps[:, 1:].flatten(0, 1)
