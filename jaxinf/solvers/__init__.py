"""Inverse-curvature-vector solvers, one module each, sharing :mod:`jaxinf.solvers.base`."""

from jaxinf.solvers.base import Solver, SolveInfo
from jaxinf.solvers.direct import DirectState, direct

__all__ = ["Solver", "SolveInfo", "DirectState", "direct"]
