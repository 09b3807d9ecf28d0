"""Symmetric eigendecompositions whose batches never hang the CPU runtime.

``A = Q diag(w) Qᵀ`` for a batch of symmetric matrices, as
``jnp.linalg.eigh``, with one difference on the CPU: the batch is decomposed
one matrix after another (``lax.map``), also when the call sits inside a
``jax.vmap``.

Why: jaxlib 0.10's CPU LAPACK kernels (``dsyevd`` for ``eigh``) split a batch
over XLA's intra-op thread pool and block until the parts are done. When as
many such calls run at once as the pool has threads (two on a two-core
machine), every thread waits for parts that no thread is free to run, and
the process hangs for ever. It happened in the K-FAC fit of notebook 03
(per-example output Hessians, vmapped, then ``eigh``): both pool threads sat
in ``ParallelBatchMap`` (issue 16, gdb backtrace in its notes). A batch of
one is decomposed on the calling thread, so a sequential map cannot wedge.
On accelerators the batched kernel is used unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_batching.custom_vmap
def _eigh_one(matrix):
    return tuple(jnp.linalg.eigh(matrix))


@_eigh_one.def_vmap
def _eigh_vmapped(axis_size, in_batched, matrix):
    del axis_size
    (batched,) = in_batched
    if not batched:
        return _eigh_one(matrix), (False, False)
    return jax.lax.map(_eigh_one, matrix), (True, True)


def eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(w, Q)`` with ``matrix = Q diag(w) Qᵀ`` (ascending ``w``) for ``[..., n, n]`` symmetric input.

    On the CPU the leading (and any ``vmap``-ped) batch axes are decomposed one
    matrix at a time; elsewhere this is ``jnp.linalg.eigh``. Not
    differentiable on the CPU path (it is meant for fitted states, which are
    not differentiated through).
    """
    if jax.default_backend() != "cpu":
        return tuple(jnp.linalg.eigh(matrix))
    if matrix.ndim == 2:
        return _eigh_one(matrix)
    batch_shape = matrix.shape[:-2]
    flat = matrix.reshape(-1, *matrix.shape[-2:])
    w, q = jax.lax.map(_eigh_one, flat)
    return w.reshape(*batch_shape, -1), q.reshape(*batch_shape, *q.shape[-2:])


def in_sequence(before, after):
    """``(before, after)`` unchanged, but the work on ``after`` cannot start before ``before`` is computed.

    XLA's CPU runtime runs independent operations of one program at once, and
    jaxlib's LAPACK kernels (``eigh``: ``dsyevd``) spread a batch over the
    same thread pool and wait for it: two of them at once on a pool of two
    threads deadlocked (issue 16). Every eigendecomposition of a K-FAC fit
    is therefore made to depend on the one before it.
    """
    return jax.lax.optimization_barrier((before, after))


def eigh_in_sequence(matrices, after=None) -> list:
    """``[(w, q)]`` of the symmetrised ``matrices``, one after another, all after ``after`` (:func:`in_sequence`).

    A ``[..., n, n]`` batch (a layer stacked along a scan: one factor per step) is decomposed by :func:`eigh`,
    one matrix at a time on the CPU.
    """
    out, previous = [], after
    for m in matrices:
        if previous is not None:
            previous, m = in_sequence(previous, m)
        if m.size == 0:  # a zero-size leaf or layer side: nothing to decompose
            out.append((jnp.zeros(m.shape[:-1], m.dtype), jnp.zeros(m.shape, m.dtype)))
            continue
        w, q = eigh(0.5 * (m + jnp.swapaxes(m, -1, -2)))
        out.append((w, q))
        previous = w
    return out
