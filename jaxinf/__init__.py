"""jaxinf: influence functions for JAX and Flax.

``I(z', z) = ∇θℓ(z')ᵀ (C + λI)⁻¹ ∇θℓ(z)`` with ``C`` the curvature (Hessian,
Gauss-Newton or empirical Fisher) of the mean training loss.
"""

from jaxinf.breakdown import influences_by_layer, influences_by_token
from jaxinf.core.compilation_cache import enable_compilation_cache
from jaxinf.core.curvature import CURVATURES, CurvatureOperator, curvature_operator
from jaxinf.core.data import Batches, as_batches
from jaxinf.core.errors import ConvergenceError, NotFittedError
from jaxinf.layers import LayerTags, find_layers, tag_dense
from jaxinf.model import InfluenceModel
from jaxinf.scoring.query_compression import CompressionReport, compress_factors
from jaxinf.scoring.tokenwise import TokenScores
from jaxinf.solvers.arnoldi import arnoldi
from jaxinf.solvers.base import Scorer, SolveInfo, Solver
from jaxinf.solvers.cg import cg
from jaxinf.solvers.datainf import DataInfState, datainf
from jaxinf.solvers.direct import DirectState, direct
from jaxinf.solvers.implicit import implicit_solve, implicit_solve_many
from jaxinf.solvers.kfac import KFACState, ekfac, kfac
from jaxinf.solvers.kfac_preconditioner import ekfac_preconditioner, kfac_preconditioner
from jaxinf.solvers.lissa import lissa
from jaxinf.solvers.lowrank import LowRankState
from jaxinf.solvers.nystrom import nystrom
from jaxinf.solvers.preconditioners import jacobi_preconditioner, nystrom_preconditioner
from jaxinf.solvers.similarity import gradient_cosine, gradient_dot, tracin

__version__ = "0.1.0"

__all__ = [
    "enable_compilation_cache",
    "CURVATURES",
    "Batches",
    "ConvergenceError",
    "InfluenceModel",
    "NotFittedError",
    "CurvatureOperator",
    "DirectState",
    "Scorer",
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
    "kfac_preconditioner",
    "ekfac_preconditioner",
    "DataInfState",
    "datainf",
    "gradient_cosine",
    "gradient_dot",
    "tracin",
    "implicit_solve",
    "implicit_solve_many",
    "influences_by_layer",
    "influences_by_token",
    "TokenScores",
    "CompressionReport",
    "compress_factors",
]
