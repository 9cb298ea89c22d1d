"""Loading a user's array file (.npy, or .npz with a named or single array)."""
from pathlib import Path

import numpy as np


def load_array(path, key, what):
    """The array in `path`: a .npy, or a .npz holding `key` (else its only array). `what` names the
    content in errors ("demonstration file", "snapshot file")."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: {what} must be a .npy or .npz file")
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.keys())
        if key in keys:
            return z[key]
        if len(keys) == 1:
            return z[keys[0]]
    raise ValueError(f"{path}: .npz holds {keys}; name the array '{key}'")
