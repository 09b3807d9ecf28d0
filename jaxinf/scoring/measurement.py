"""Measurement functions: the quantity attributed on the test side of an influence.

Influence functions attribute a differentiable quantity ``f`` of the trained
model to the training points; by default ``f`` is the training loss on the
test point, but what one asks about is often something else: the
log-probability of a completion given a prompt, a margin, one logit
(Koh & Liang 2017, Eq. 2, with ``f`` in place of the test loss; Grosse et al.
2023 call ``f`` the measurement).
With a measurement ``f(params, batch)``, the **mean** over the batch of a
per-example quantity, the up-weighting influence is::

    I[i, j] = + ∇θf(test_i)ᵀ (C + λI)⁻¹ ∇θℓ(train_j)

in the units of ``f``: up-weighting training point ``j`` by ``ε`` changes
``f(test_i)`` by about ``−ε·I[i, j]``, removing it (``ε = −1/n``) by about
``+I[i, j]/n``. "Positive = helpful" therefore holds for an ``f`` one wants
small (a negative log-probability); for a log-probability itself a positive
score means that the training point *lowers* it. Only the test side changes:
the curvature ``C`` and the training side stay those of the training loss.

References:
  Koh & Liang, "Understanding Black-box Predictions via Influence Functions",
  ICML 2017. Grosse et al., "Studying Large Language Model Generalization with
  Influence Functions", 2023.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxinf.core.checks import check_loss

PyTree = Any

__all__ = ["check_measurement"]


def check_measurement(measurement: Any, params: PyTree, batches: list) -> Callable:
    """Return ``measurement`` after checking that it is a finite float scalar, the mean over the batch.

    Args:
      measurement: ``f(params, batch) -> scalar``.
      params: the parameters.
      batches: the test batches (a list; only the first ones are evaluated, on
        at most :data:`jaxinf.core.checks.CHECK_EXAMPLES` examples).

    Raises:
      TypeError: ``measurement`` is not callable.
      ValueError: it returns a non-scalar or non-float value, NaN or inf, or
        something other than the mean of its per-example values (a sum, a
        value that couples the examples); see
        :func:`jaxinf.core.checks.check_loss`.
    """
    if not callable(measurement):
        raise TypeError(
            "measurement must be a callable f(params, batch) -> scalar mean over the batch (or None for the "
            f"training loss), got {type(measurement).__name__}."
        )
    out = jax.eval_shape(measurement, params, batches[0])
    if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
        got = f"shape {out.shape}, dtype {out.dtype}" if hasattr(out, "shape") else type(out).__name__
        raise ValueError(
            f"measurement must return a float scalar, the mean over the batch of a per-example quantity; on a "
            f"batch it returns {got}. Average the per-example values (jnp.mean)."
        )
    check_loss(measurement, params, iter(batches), name="measurement")
    return measurement
