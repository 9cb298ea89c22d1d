"""Errors and warnings raised by the engine, and input checks shared by it."""
import torch


class ImplicitDiffError(ValueError):
    """Bad input to the engine: shapes that do not match, NaN or inf values."""


class BackwardSolveError(RuntimeError):
    """The backward linear system is singular, ill-conditioned or was not solved."""


class ConvergenceWarning(UserWarning):
    """An inner or backward solve stopped above its tolerance; the gradient may be wrong."""


def check_finite(leaves, what):
    """Raise ImplicitDiffError naming `what` if any tensor leaf holds NaN or inf."""
    for i, t in enumerate(leaves):
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise ImplicitDiffError(f"{what} leaf {i} (shape {tuple(t.shape)}) contains {bad}")
