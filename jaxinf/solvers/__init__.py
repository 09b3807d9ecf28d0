"""Inverse-curvature-vector solvers, one module each, sharing :mod:`jaxinf.solvers.base`."""

from jaxinf.solvers.arnoldi import arnoldi
from jaxinf.solvers.base import SolveInfo, Solver
from jaxinf.solvers.cg import CGState, cg
from jaxinf.solvers.direct import DirectState, direct
from jaxinf.solvers.kfac import KFACState, ekfac, kfac
from jaxinf.solvers.lissa import LissaState, lissa
from jaxinf.solvers.nystrom import nystrom
from jaxinf.solvers.preconditioners import Preconditioner, jacobi_preconditioner, nystrom_preconditioner

__all__ = ["Solver", "SolveInfo", "DirectState", "direct", "KFACState", "ekfac", "kfac", "arnoldi", "nystrom",
           "CGState", "cg", "LissaState", "lissa", "Preconditioner", "jacobi_preconditioner",
           "nystrom_preconditioner"]
