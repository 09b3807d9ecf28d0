"""Batches visited at one size: a smaller batch padded with masked examples, a larger one cut into pieces.

Per-example sums and per-example quantities (K-FAC/EK-FAC's statistics,
per-example gradients) are unchanged by padding whose rows are masked out
and by cutting, so one traced and compiled step of one batch size can serve
every batch, a ragged last one too (issue 15, "no retrace for a ragged last
batch"). :func:`one_size_steps` does it in memory (inside ``jit``: K-FAC's
``lax.scan`` over the steps), :func:`host_pieces` on the host
for streams. A padding row repeats its batch's last example (and index), so
every value stays finite and the mask removes it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.data import Batches, batch_size
from jaxinf.core.memory import rows_at

PyTree = Any


def rest_in_pieces(data: Batches, size: int):
    """The batches of ``data.rest`` cut into pieces of ``size`` examples, each batch's last piece padded.

    Returns ``(pieces, indices, mask)``: ``pieces`` stacked ``(m, size, ...)``,
    ``indices`` ``(m, size)`` the examples' global indices (the stacked batches
    come first, then the rest batches in order) and ``mask`` ``(m, size)``,
    ``False`` on padding. A padding row repeats its batch's last example (its
    index too), so every value stays finite and the mask removes it exactly.
    Only the rest batches are copied; the stacked ones are not touched.
    ``size`` must be the stacked batches' size when there are any.
    """
    stacked_size = int(np.shape(jax.tree.leaves(data.stacked)[0])[1]) if data.num_stacked else size
    if size != stacked_size:
        raise ValueError(f"pieces of {size} examples, but the stacked batches hold {stacked_size} each")
    offset = data.num_stacked * size
    pieces, indices, masks = [], [], []
    for b in data.rest:
        r = batch_size(b)
        steps = -(-r // size)
        slots = jnp.arange(steps * size)
        pos = jnp.minimum(slots, r - 1)
        shape = (steps, size)
        if r == steps * size:  # whole pieces: a reshape, nothing gathered
            pieces.append(jax.tree.map(lambda a, s=shape: jnp.reshape(a, (*s, *a.shape[1:])), b))
        else:
            pieces.append(jax.tree.map(lambda a, s=shape, p=pos: jnp.reshape(a[p], (*s, *a.shape[1:])), b))
        indices.append(jnp.reshape(offset + pos, shape).astype(jnp.uint32))
        masks.append(jnp.reshape(slots < r, shape))
        offset += r
    if len(pieces) == 1:
        return pieces[0], indices[0], masks[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *pieces), jnp.concatenate(indices), jnp.concatenate(masks)


class OneSizeSteps(NamedTuple):
    """Every example of a :class:`Batches` once, in steps of ``size`` examples (:func:`one_size_steps`).

    ``lax.scan`` over ``xs``; ``at(x)`` is the step's
    ``(batch, indices, mask)``: ``size`` examples, their global indices and
    ``None`` (no padding anywhere) or a mask, ``False`` on padding.
    ``count`` steps; ``pieces[j]``: the steps of ``data.rest[j]``.
    """

    xs: PyTree
    at: Callable
    size: int
    count: int
    pieces: tuple


def one_size_steps(data: Batches) -> OneSizeSteps:
    """Steps of one size that visit every example of ``data`` once: the stacked batches, then :func:`rest_in_pieces`.

    ``size`` is the stacked batches' (else the largest batch's). For sums and
    per-example quantities, which padding (masked) and cutting leave exact,
    one traced and compiled step serves every batch, a ragged last one too.
    """
    k = data.num_stacked
    size = int(np.shape(jax.tree.leaves(data.stacked)[0])[1]) if k else max(batch_size(b) for b in data.rest)

    def own(t):
        return (t * size + jnp.arange(size)).astype(jnp.uint32)

    if not data.rest:
        return OneSizeSteps((data.stacked, jnp.arange(k)), lambda x: (x[0], own(x[1]), None), size, k, ())
    pieces, indices, mask = rest_in_pieces(data, size)
    m = int(np.shape(mask)[0])
    per_batch = tuple(-(-batch_size(b) // size) for b in data.rest)

    def at(t):  # step t: stacked batch t, then rest piece t - k
        j = jnp.clip(t - k, 0, m - 1)
        piece = jax.tree.map(lambda a: a[j], pieces)
        if not k:
            return piece, indices[j], mask[j]
        first, i = t < k, jnp.minimum(t, k - 1)
        batch = jax.tree.map(lambda a, p: jnp.where(first, a[i], p), data.stacked, piece)
        return batch, jnp.where(first, own(t), indices[j]), jnp.where(first, True, mask[j])

    return OneSizeSteps(jnp.arange(k + m), at, size, k + m, per_batch)


def host_pieces(batch: PyTree, indices: np.ndarray, size: int):
    """``(piece, piece_indices, mask)`` pieces of ``size`` examples of one batch, the last padded (host side).

    The streamed counterpart of :func:`rest_in_pieces`: a batch of exactly
    ``size`` examples is one piece, unchanged; a smaller one (a ragged last
    batch) is padded by repeating its last example and index, a larger one cut.
    ``mask`` is ``False`` on padding. Host arrays and arrays held on one
    device are cut and padded through NumPy, compiling nothing
    (:func:`jaxinf.core.memory.rows_at`); arrays spread over several devices
    by JAX on them.
    """

    n = batch_size(batch)
    for start in range(0, n, size):
        pos = np.minimum(np.arange(start, start + size), n - 1)
        if start == 0 and n == size:
            yield batch, indices, np.ones(size, bool)
            continue
        yield (
            jax.tree.map(lambda a, p=pos: rows_at(a, p), batch),
            np.asarray(indices)[pos],
            np.arange(start, start + size) < n,
        )
