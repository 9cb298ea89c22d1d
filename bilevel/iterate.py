"""Iterative inner solvers with a switchable backward mode.

Every mode is "how many of the last iterations run with grad on":
implicit = none, then one implicit-function step; unrolled = all; truncated = the last k.
"""
import torch

from .implicit import implicit_fixed_point, implicit_root

MODES = ("implicit", "unrolled", "truncated")


def iterate(step, z0, theta, n_steps, *, backward="implicit", k=None, optimality=None, **implicit_opts):
    """Run z <- step(z, theta) n_steps times from z0 and return z, differentiable in theta.

    backward: 'implicit' (optimality(z, theta) = 0 if given, else the fixed point of step),
        'unrolled' (autograd through every step) or 'truncated' (through the last k steps).
    implicit_opts go to implicit_root (solve, ridge, tol, batched, strict, ...).
    """
    if backward not in MODES:
        raise ValueError(f"backward must be one of {MODES}, got {backward!r}")
    if backward == "truncated" and (k is None or not 0 <= k <= n_steps):
        raise ValueError(f"backward='truncated' needs 0 <= k <= n_steps, got k={k}")
    n_grad = {"implicit": 0, "unrolled": n_steps, "truncated": k}[backward]
    z = z0
    with torch.no_grad():
        for _ in range(n_steps - n_grad):
            z = step(z, theta)
    for _ in range(n_grad):
        z = step(z, theta)
    if backward != "implicit":
        return z
    if optimality is not None:
        return implicit_root(optimality, z, theta, **implicit_opts)
    return implicit_fixed_point(step, z, theta, **implicit_opts)
