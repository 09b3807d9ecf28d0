"""``damping="auto"``: a damping relative to the mean eigenvalue of the curvature.

The rule is ``λ = α · tr(C)/P``: a fixed fraction ``α`` (:data:`AUTO_SCALE`)
of the mean eigenvalue of the undamped curvature ``C`` of the mean training
loss (``P`` parameters). Relative to ``tr(C)/P`` the damping is invariant to a
rescaling of the loss, and its effect on ``(C + λI)⁻¹`` is the same for models
whose curvature differs only in scale. ``α`` was chosen by measurement:
``benchmarks/damping.py`` retrains MLPs on random halves of their training set
and scores exact Gauss-Newton influence at each ``α`` by its linear
datamodeling score (Park et al. 2023); the table it writes
(``benchmarks/results/damping.md``) shows how the agreement with retraining
moves with ``α``.

``tr(C)`` is estimated without forming ``C``, one Rademacher probe per
training example (Hutchinson 1989, with the probes spread over the examples):
``C = (1/n) Σ_i C_i`` with ``C_i`` the curvature of example ``i``'s loss, so

    tr(C) ≈ (1/n) Σ_i v_iᵀ C_i v_i,   v_i ∈ {−1, +1}^P independent,

which is unbiased and whose variance falls as ``1/n`` (the probes are
independent across examples), at the cost of one per-example curvature-vector
product per example (about two passes of per-example gradients). Probe ``i``
is keyed by the example's index in the data, so the estimate is reproducible.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.data import add_example_axis, batch_size

PyTree = Any

#: ``α`` in ``λ = α · tr(C)/P``, measured with ``benchmarks/damping.py`` (see the module docstring).
AUTO_SCALE = 10.0
_SEED = 20261130  # the probes' seed: fixed, so the same data and params give the same damping

__all__ = ["AUTO_SCALE", "auto_damping", "damping_by_block", "is_auto", "mean_eigenvalue", "with_auto_damping"]


def is_auto(damping: Any) -> bool:
    """Whether ``damping`` asks for the rule of this module (the string ``"auto"``)."""
    return isinstance(damping, str) and damping == "auto"


@jax.jit
def _batch_quadratics(operator: CurvatureOperator, batch: PyTree, indices: jax.Array, key: jax.Array) -> jax.Array:
    """``Σ_i v_iᵀ C_i v_i`` over the examples of ``batch`` (``indices``: their positions in the data)."""
    leaves, treedef = jax.tree.flatten(operator.params)

    def one(example, index):
        keys = jax.random.split(jax.random.fold_in(key, index), len(leaves))
        v = jax.tree.unflatten(
            treedef, [jax.random.rademacher(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
        )
        cv = operator.batch_curvature_vp(add_example_axis(example), v)
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(cv)))

    return jnp.sum(jax.vmap(one)(batch, indices))


def mean_eigenvalue(operator: CurvatureOperator, *, seed: int = _SEED) -> float:
    """``tr(C)/P`` of the operator's undamped, full curvature, estimated as in the module docstring."""
    key = jax.random.key(seed)
    total, offset = 0.0, 0
    for batch in operator.data.batches():  # summed on the device; one host read at the end
        n = batch_size(batch)
        total = total + _batch_quadratics(operator, batch, jnp.arange(offset, offset + n, dtype=jnp.uint32), key)
        offset += n
    return float(total) / offset / operator.size


def auto_damping(operator: CurvatureOperator, *, scale: float = AUTO_SCALE) -> float:
    """``λ = scale · tr(C)/P`` for the operator's curvature ``C`` (its own damping is ignored).

    Raises:
      ValueError: the estimated mean eigenvalue is not positive and finite
        (an indefinite Hessian far from a minimum, or a zero curvature): name
        a damping, or use ``curvature="gauss_newton"`` (positive
        semi-definite for a convex output loss).
    """
    mean = mean_eigenvalue(operator)
    if not np.isfinite(mean) or mean <= 0:
        raise ValueError(
            f"damping='auto' sets λ = {scale:g} · tr(C)/P, but the estimated mean eigenvalue of the "
            f"{operator.kind} curvature is {mean:.3g} (not positive). Give damping a number (e.g. 1e-3), or use "
            "curvature='gauss_newton', whose mean eigenvalue is positive for a convex output loss."
        )
    return scale * mean


def with_auto_damping(operator: CurvatureOperator) -> CurvatureOperator:
    """The operator damped by :func:`auto_damping` (one λ for every block); in-memory data on one process only."""
    if jax.process_count() > 1:
        raise ValueError(
            "damping='auto' is resolved from in-memory data on one process; in a multi-process run give damping a "
            "number (e.g. from jaxinf.core.damping.auto_damping(operator) on one process's data)."
        )
    return operator.with_damping(auto_damping(operator))


def damping_by_block(operator: CurvatureOperator) -> float | dict:
    """The operator's damping as given: one float, or ``{block: λ}`` when the blocks differ."""
    per_block: dict = {}
    for leaf, block in enumerate(operator.block_ids):
        per_block.setdefault(operator.block_names[block], float(np.asarray(operator.damping[leaf])))
    values = set(per_block.values())
    return values.pop() if len(values) == 1 else per_block
