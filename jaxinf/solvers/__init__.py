"""Inverse-curvature-vector solvers, one module each, sharing :mod:`jaxinf.solvers.base`."""

from jaxinf.solvers.base import Solver, SolveInfo
from jaxinf.solvers.direct import DirectState, direct
from jaxinf.solvers.arnoldi import arnoldi
from jaxinf.solvers.nystrom import nystrom

__all__ = ["Solver", "SolveInfo", "DirectState", "direct", "arnoldi", "nystrom"]
