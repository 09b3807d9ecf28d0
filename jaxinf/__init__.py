"""jaxinf: influence functions for JAX and Flax.

``I(z', z) = ∇θℓ(z')ᵀ (C + λI)⁻¹ ∇θℓ(z)`` with ``C`` the curvature (Hessian,
Gauss-Newton or empirical Fisher) of the mean training loss.
"""

from jaxinf.curvature import CURVATURES, CurvatureOperator, curvature_operator
from jaxinf.data import Batches, as_batches
from jaxinf.influence import ConvergenceError, InfluenceModel, NotFittedError
from jaxinf.solvers import DirectState, Solver, SolveInfo, direct
from jaxinf.solvers import KFACState, ekfac, kfac
from jaxinf.tagging import LayerTags, find_layers, tag_dense
from jaxinf.solvers import arnoldi, nystrom
from jaxinf.solvers import cg, jacobi_preconditioner, lissa, nystrom_preconditioner
from jaxinf.lowrank import LowRankState

__version__ = "0.1.0"

__all__ = [
    "CURVATURES",
    "Batches",
    "ConvergenceError",
    "InfluenceModel",
    "NotFittedError",
    "CurvatureOperator",
    "DirectState",
    "Solver",
    "SolveInfo",
    "as_batches",
    "curvature_operator",
    "direct",
    "KFACState",
    "LayerTags",
    "ekfac",
    "find_layers",
    "kfac",
    "tag_dense",
    "arnoldi",
    "nystrom",
    "LowRankState",
    "cg",
    "lissa",
    "jacobi_preconditioner",
    "nystrom_preconditioner",
]
