"""LiSSA's ``scale`` from the curvature: ``s = SAFETY · max_b ‖C_b + Λ‖₂`` by power iteration on minibatches.

LiSSA's recursion ``h ← v + h − A_t h / s`` contracts when every eigenvalue of
the damped minibatch curvature ``A_t = C_t + Λ`` lies in ``(0, 2s)``, and the
steps it needs grow like ``s / λ_min(C + Λ)``: the best scale sits just above
the largest eigenvalue of the minibatches it will draw. A fixed default
(pyDVL's is 10) is 5× the largest eigenvalue of the minibatches of 64 of the
digits MLP of :mod:`jaxinf.demo` (0.73–1.84) and 40× that of the MLP of
``examples/flax_nnx.py`` (0.11–0.26), and too small for sharper networks.

:func:`auto_scale` estimates ``‖A_b‖₂`` on :data:`NUM_BATCHES` minibatches
of the solver's size (drawn with a key of their own) by :data:`POWER_STEPS`
steps of power iteration each, ``u ← A_b u / ‖A_b u‖``, and returns
:data:`SAFETY` times the largest. Power iteration approaches ``‖A_b‖₂`` from
below and the solve draws thousands of minibatches, of which these are a
sample; the recursion still contracts while ``‖A_t‖₂ < 2s``, twice the
estimate, which leaves room for both (at 1.5 times the estimate the demo
MLP's error after 8,192 steps was 7.0 % against 2.8 % at 1.0; neither
diverged). A minibatch beyond
that makes the norm grow, which the solve detects and reports as a
divergence. Cost: ``NUM_BATCHES · POWER_STEPS`` minibatch products
(160), once per ``init``; a full-data solver (``batch_size=None``) takes
:data:`POWER_STEPS` full-data products instead.

References:
  Agarwal, Bullins & Hazan, "Second-Order Stochastic Optimization for
  Machine Learning in Linear Time", JMLR 18, 2017 (the condition on the scale).
  Golub & Van Loan, "Matrix Computations", 4th ed., §8.2.1 (power iteration).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.minibatch import example_pool, sample_minibatch
from jaxinf.core.tree import tree_norm, tree_scale, unravel

#: Scale = SAFETY × the largest estimated norm of a damped minibatch curvature.
SAFETY = 1.0
#: Minibatches whose curvature norm is estimated.
NUM_BATCHES = 8
#: Power-iteration steps per minibatch.
POWER_STEPS = 20


def auto_scale(operator: CurvatureOperator, key: jax.Array, batch_size: int | None):
    """``SAFETY · max_b ‖C_b + Λ‖₂`` over :data:`NUM_BATCHES` minibatches of ``batch_size`` (module docstring).

    Args:
      operator: the damped curvature operator.
      key: PRNG key for the minibatches and the start vectors.
      batch_size: LiSSA's minibatch size; ``None`` (or at least the number of
        examples): the full-data operator, once.

    Returns:
      A scalar in the operator's dtype, with ``stop_gradient``: positive and
      finite when the curvature is (a zero curvature with zero damping gives
      1, the system is singular anyway); NaN when the products are.
    """
    spec = operator.spec
    stochastic = batch_size is not None and batch_size < operator.num_examples
    if stochastic:
        keys = jax.random.split(key, NUM_BATCHES)
        pool = example_pool(operator.data)

        def norm_on(k):
            batch_key, start_key = jax.random.split(k)
            batch = sample_minibatch(pool, batch_key, batch_size)
            return _power_norm(lambda u: operator.batch_matvec(batch, u), spec, start_key, operator.dtype)

        top = jnp.max(jax.lax.map(norm_on, keys))
    else:
        top = _power_norm(operator.matvec, spec, key, operator.dtype)
    scale = jnp.where(top > 0, SAFETY * top, jnp.ones_like(top))
    return jax.lax.stop_gradient(scale)


def _power_norm(product, spec, key, dtype):
    """``‖A u_K‖`` after ``POWER_STEPS`` steps ``u ← A u / ‖A u‖`` from a Gaussian ``u₀`` (``≤ ‖A‖₂``)."""
    u = unravel(spec, jax.random.normal(key, (spec.size,), dtype))
    u = tree_scale(1 / tree_norm(u), u)

    def step(_, carry):
        u, _ = carry
        au = product(u)
        norm = tree_norm(au)
        return tree_scale(1 / jnp.where(norm > 0, norm, 1), au), norm

    return jax.lax.fori_loop(0, POWER_STEPS, step, (u, jnp.zeros((), dtype)))[1]
