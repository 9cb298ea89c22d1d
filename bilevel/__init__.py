"""Generic implicit-gradient engine: differentiate any inner solver through its optimality condition."""
from . import linear_solve
from .errors import BackwardSolveError, ConvergenceWarning, ImplicitDiffError
from .gradcheck import GradCheck, check_gradient
from .implicit import (custom_fixed_point, custom_root, fixed_point_residual, implicit_fixed_point,
                       implicit_root)
from .iterate import MODES, iterate

__all__ = ["implicit_root", "implicit_fixed_point", "custom_root", "custom_fixed_point",
           "fixed_point_residual", "iterate", "MODES", "linear_solve", "check_gradient", "GradCheck",
           "ImplicitDiffError", "BackwardSolveError", "ConvergenceWarning"]
