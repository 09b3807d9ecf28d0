"""Inverse-curvature-vector solvers: the protocol (:mod:`~jaxinf.solvers.base`) and one module per family.

The factories are public at the top level (``jaxinf.direct()``,
``jaxinf.cg(...)``, ...); here each name is its module, so dotted paths such
as ``jaxinf.solvers.kfac.influences_by_layer`` resolve.

* :mod:`~jaxinf.solvers.base` — :class:`Solver`, :class:`Scorer`, :class:`SolveInfo`, :func:`solve_many`.
* :mod:`~jaxinf.solvers.direct` — exact, from a dense Cholesky factorisation or eigendecomposition.
* :mod:`~jaxinf.solvers.cg` — (block) conjugate gradient; :mod:`~jaxinf.solvers.preconditioners` for it.
* :mod:`~jaxinf.solvers.kfac_preconditioner` — K-FAC / EK-FAC as pre-conditioners of CG.
* :mod:`~jaxinf.solvers.lissa` — stochastic Neumann series.
* :mod:`~jaxinf.solvers.arnoldi`, :mod:`~jaxinf.solvers.nystrom` — low-rank (:mod:`~jaxinf.solvers.lowrank`).
* :mod:`~jaxinf.solvers.datainf` — DataInf (Sherman–Morrison per example, Kwon et al. 2023).
* :mod:`~jaxinf.solvers.similarity` — gradient dot product, cosine and TracIn baselines.
* :mod:`~jaxinf.solvers.implicit` — differentiable solves (:mod:`~jaxinf.solvers.autodiff`: the implicit rule).
* :mod:`~jaxinf.solvers.kfac` — K-FAC and EK-FAC (:mod:`~jaxinf.solvers.kfac_plan` builds the per-layer plan,
  :mod:`~jaxinf.solvers.kfac_fit` runs the factor passes).
"""

from jaxinf.solvers import (
    arnoldi,
    autodiff,
    base,
    cg,
    datainf,
    direct,
    implicit,
    kfac,
    kfac_preconditioner,
    lissa,
    lowrank,
    nystrom,
    preconditioners,
    similarity,
)
from jaxinf.solvers.base import Scorer, SolveInfo, Solver, solve_many

__all__ = ["Scorer", "SolveInfo", "Solver", "arnoldi", "base", "cg", "direct", "kfac", "lissa", "lowrank", "nystrom",
           "preconditioners", "kfac_preconditioner", "solve_many", "datainf", "similarity",
           "autodiff", "implicit"]
