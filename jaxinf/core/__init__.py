"""The core: pytree arithmetic, batches, curvature operators, randomized sketches, memory and errors.

Nothing here imports anything else of jaxinf: every other layer builds on it.

* :mod:`~jaxinf.core.tree` — raveling and arithmetic on parameter pytrees, structure checks.
* :mod:`~jaxinf.core.data` — one batch or many: sizes, size-weighted means, iteration.
* :mod:`~jaxinf.core.curvature` — ``v ↦ (C + λI) v`` for the Hessian, Gauss-Newton and empirical Fisher.
* :mod:`~jaxinf.core.sketch` — randomized Nyström sketches of a curvature operator.
* :mod:`~jaxinf.core.memory` — the free memory of a device.
* :mod:`~jaxinf.core.errors` — ``ConvergenceError``, ``NotFittedError``.
"""

from jaxinf.core.curvature import CURVATURES, CurvatureOperator, curvature_operator
from jaxinf.core.data import Batches, as_batches
from jaxinf.core.errors import ConvergenceError, NotFittedError

__all__ = [
    "CURVATURES",
    "Batches",
    "ConvergenceError",
    "CurvatureOperator",
    "NotFittedError",
    "as_batches",
    "curvature_operator",
]
