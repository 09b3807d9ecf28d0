"""jaxinf: influence functions for JAX and Flax.

``I(z', z) = ∇θℓ(z')ᵀ (C + λI)⁻¹ ∇θℓ(z)`` with ``C`` the curvature (Hessian,
Gauss-Newton or empirical Fisher) of the mean training loss.
"""

from jaxinf.curvature import CURVATURES, CurvatureOperator, curvature_operator
from jaxinf.data import Batches, as_batches
from jaxinf.influence import ConvergenceError, InfluenceModel, NotFittedError
from jaxinf.lowrank import LowRankState
from jaxinf.solvers import (
    DirectState,
    KFACState,
    SolveInfo,
    Solver,
    arnoldi,
    cg,
    direct,
    ekfac,
    jacobi_preconditioner,
    kfac,
    lissa,
    nystrom,
    nystrom_preconditioner,
)
from jaxinf.tagging import LayerTags, find_layers, tag_dense

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
