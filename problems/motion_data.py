"""Demonstrations for geodesic motion skills: built-in 2-D / 3-D trajectory families and user files.

A demonstration set is a float array [demo, time, dim] (dim 2 or 3). Built-in families are smooth
templates on s in [0, 1]; each demonstration gets a seeded random time warp, a smooth low-frequency
perturbation that vanishes at neither end (starts and goals vary a little, as human demos do) and a
small white noise.
"""
from pathlib import Path

import numpy as np

from .arrays import load_array


def _s_shape(s):
    return np.stack([0.6 * np.sin(2 * np.pi * s), 1.0 - 2.0 * s], -1)


def _c_shape(s):
    a = np.pi * (0.25 + 1.5 * s)          # three quarters of a circle, open to the right
    return np.stack([np.cos(a), np.sin(a)], -1)


def _spiral(s):
    a = 3.0 * np.pi * s
    r = 1.0 - 0.7 * s
    return np.stack([r * np.cos(a), r * np.sin(a)], -1)


def _helix(s):
    a = 2.5 * np.pi * s
    return np.stack([np.cos(a), np.sin(a), 2.0 * s - 1.0], -1)


def _saddle(s):
    a = np.pi * (0.2 + 1.6 * s)
    x, y = np.cos(a), np.sin(a)
    return np.stack([x, y, 0.8 * (x ** 2 - y ** 2)], -1)


FAMILIES = {"s_shape": _s_shape, "c_shape": _c_shape, "spiral": _spiral,
            "helix": _helix, "saddle": _saddle}
DEFAULT_FAMILY = "c_shape"


def make_demos(name=DEFAULT_FAMILY, n_demos=6, n_time=100, noise=0.04, seed=0):
    """Seeded demonstrations of a built-in family -> float64 array [n_demos, n_time, dim]."""
    if name not in FAMILIES:
        raise ValueError(f"unknown demonstration family {name!r}; choose from {sorted(FAMILIES)}")
    if n_demos < 1 or n_time < 2:
        raise ValueError(f"need n_demos >= 1 and n_time >= 2, got {n_demos}, {n_time}")
    rng = np.random.default_rng(seed)
    s = np.linspace(0.0, 1.0, n_time)
    warp = 1.0 + 0.25 * rng.uniform(-1, 1, (n_demos, 1))                 # speed profile s -> s^w
    clean = FAMILIES[name](s[None] ** warp)                                # [demo, time, dim]
    dim = clean.shape[-1]
    freq = np.arange(1, 4)                                                 # low frequencies only
    amp = noise * rng.normal(size=(n_demos, 3, dim)) / freq[None, :, None]
    phase = rng.uniform(0, 2 * np.pi, (n_demos, 3, dim))
    wave = np.sin(np.pi * freq[None, :, None, None] * s[None, None, :, None] + phase[:, :, None, :])
    smooth = np.einsum("nkd,nktd->ntd", amp, wave)
    white = 0.1 * noise * rng.normal(size=clean.shape)
    return clean + smooth + white


def check_demos(demos, where="demonstrations"):
    """Validate an array [demo, time, dim], dim 2 or 3, finite; returns it as float64."""
    arr = np.asarray(demos)
    if arr.ndim != 3:
        raise ValueError(f"{where}: expected an array of shape [demo, time, dim], got shape {arr.shape}")
    n, t, d = arr.shape
    if n < 1 or t < 2:
        raise ValueError(f"{where}: need at least 1 demonstration of at least 2 time steps, got shape {arr.shape}")
    if d not in (2, 3):
        raise ValueError(f"{where}: dim must be 2 or 3 (positions), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{where}: expected numbers, got dtype {arr.dtype}")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        raise ValueError(f"{where}: {int(bad.sum())} non-finite values (NaN/inf), first at [demo, time, dim] = {i}")
    return arr.astype(np.float64)


def load_demos(path):
    """Read a user's .npy, or .npz (key 'demos', else its only array), of shape [demo, time, dim]."""
    return check_demos(load_array(path, "demos", "demonstration file"), where=str(path))


def get_demos(spec=DEFAULT_FAMILY, seed=0, **kw):
    """A family name or a file path -> (name, array [demo, time, dim])."""
    if spec in FAMILIES:
        return spec, make_demos(spec, seed=seed, **kw)
    if Path(spec).suffix in (".npy", ".npz"):
        return Path(spec).stem, load_demos(spec)
    raise ValueError(f"--demos {spec!r} is neither a built-in family {sorted(FAMILIES)} nor a .npy/.npz file")
