"""Minibatches drawn inside ``jit``: uniform with replacement over every example of a :class:`jaxinf.Batches`.

The stochastic solvers (LiSSA's recursion and its scale estimate) draw a
fresh minibatch at every step from a key, without leaving the compiled
program: the dataset is viewed as (at most) two flat example arrays, the
stacked equal batches and the ragged rest, and ``size`` indices are drawn
from their union.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxinf.core.data import Batches
from jaxinf.core.data import batch_size as leading_size

PyTree = Any


class Pool(NamedTuple):
    """The dataset as (at most) two flat example arrays: the stacked batches and the rest."""

    stacked: PyTree  # leaves (K·B, ...) or None
    rest: PyTree  # leaves (R, ...) or None
    num_stacked: int


def example_pool(data: Batches) -> Pool:
    """``data`` flattened into a :class:`Pool` (the ragged batches concatenated), once per traced solve."""
    stacked, num_stacked = None, 0
    if data.stacked is not None:
        stacked = jax.tree.map(lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]), data.stacked)
        num_stacked = leading_size(stacked)
    rest = None
    if data.rest:
        rest = jax.tree.map(lambda *xs: jnp.concatenate([jnp.asarray(x) for x in xs]), *data.rest)
    return Pool(stacked, rest, num_stacked)


def sample_minibatch(pool: Pool | Batches, key: jax.Array, size: int) -> PyTree:
    """``size`` examples drawn uniformly with replacement from every example of the dataset.

    Args:
      pool: the dataset, a :class:`jaxinf.Batches` (or its :func:`example_pool`).
      key: ``jax.random`` key.
      size: static number of examples in the minibatch.

    Returns:
      A batch with the data's structure and leading size ``size``.
    """
    if isinstance(pool, Batches):
        pool = example_pool(pool)
    num_rest = 0 if pool.rest is None else leading_size(pool.rest)
    total = pool.num_stacked + num_rest
    idx = jax.random.randint(key, (size,), 0, total)
    if pool.rest is None:
        return jax.tree.map(lambda a: a[idx], pool.stacked)
    if pool.stacked is None:
        return jax.tree.map(lambda a: a[idx], pool.rest)
    in_stacked = idx < pool.num_stacked
    first = jnp.clip(idx, 0, pool.num_stacked - 1)
    second = jnp.clip(idx - pool.num_stacked, 0, num_rest - 1)

    def pick(a, b):
        mask = in_stacked.reshape((size,) + (1,) * (a.ndim - 1))
        return jnp.where(mask, a[first], b[second])

    return jax.tree.map(pick, pool.stacked, pool.rest)
