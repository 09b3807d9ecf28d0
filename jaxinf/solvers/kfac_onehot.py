"""K-FAC and EK-FAC statistics of a layer with one-hot inputs (an embedding), by token id, never by one-hot rows.

For ``s_t = Wᵀ onehot(id_t)`` (``W`` the ``V × D`` table) the input factor
``A = E[Σ_t onehot(id_t) onehot(id_t)ᵀ]`` is diagonal: the mean count of
each id per example. Its eigenbasis is the identity, so the fit keeps ``A``
as the vector of counts (no ``V × V`` matrix, no eigendecomposition), and
EK-FAC's pass 2 needs the per-example gradient in the basis ``(I, Q_G)``,
``M = Σ_t e_{id_t} (Q_Gᵀ g_t)ᵀ``, whose row ``v`` is the sum of ``Q_Gᵀ g_t``
over the locations reading id ``v``. Its squares are formed per location
(``T × T`` id equalities per example) and scattered into the ``V`` rows.

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature", ICML 2015. George et al., "Fast Approximate Natural
  Gradient Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _over_leading(fn, ndim: int):
    for _ in range(ndim):
        fn = jax.vmap(fn)
    return fn


def id_counts(ids, size: int, dtype):
    """``Σ_{n,t} onehot(ids[n, ..., t])`` per leading step: ``ids`` ``(n, [L,] T)`` -> ``([L,] size)``.

    Ids equal to ``size`` (no row read) are dropped.
    """
    ids = jnp.moveaxis(ids, 0, -2)
    ids = jnp.reshape(ids, (*ids.shape[:-2], -1))
    count = _over_leading(lambda i: jnp.zeros((size,), dtype).at[i].add(1.0, mode="drop"), ids.ndim - 1)
    return count(ids)


def scatter_rows(vals, ids, size: int):
    """``Σ_{n,t} e_{ids[n, ..., t]} vals[n, ..., t]ᵀ``: ``vals`` ``(n, [L,] T, d)`` -> ``([L,] size, d)``."""
    vals, ids = jnp.moveaxis(vals, 0, -3), jnp.moveaxis(ids, 0, -2)
    vals = jnp.reshape(vals, (*vals.shape[:-3], -1, vals.shape[-1]))
    ids = jnp.reshape(ids, (*ids.shape[:-2], -1))
    width = vals.shape[-1]

    def one(v, i):
        return jnp.zeros((size, width), v.dtype).at[i].add(v, mode="drop")

    return _over_leading(one, ids.ndim - 1)(vals, ids)


def _squares_one_step(ids, gq):
    """One example and step: ``ids`` ``(T,)``, ``gq = g Q_G`` ``(K, T, d)`` -> per location ``(T, d)``.

    Location ``t`` carries ``Σ_k M[k, id_t]² / m_t``, ``m_t`` the number of locations reading ``id_t``, so
    the scatter of all locations gives ``Σ_k M[k]²`` row by row.
    """
    same = (ids[:, None] == ids[None, :]).astype(gq.dtype)
    rows = jnp.einsum("tu,kuo->kto", same, gq)
    return jnp.sum(rows * rows, axis=0) / jnp.sum(same, axis=1)[:, None]


def rotated_squares(layer, ids, g, rest, qg):
    """EK-FAC pass 2, one example: ``(vals, ids)`` whose :func:`scatter_rows` is ``Σ_k (M_k)²``, ``([L,] V, d)``.

    ``ids`` ``([L,] T)`` and ``g`` ``(K, [L,] T, d_out)`` from :func:`jaxinf.layers.statistics.layer_ids` and
    :func:`~jaxinf.layers.statistics.layer_output_grads`; ``rest`` ``(K, [L,] V, d_out)`` (the gradients of the
    table's non-layer uses) or ``None``. With ``rest``, ``M`` is formed densely (``K × V × d_out``).
    """
    gq = g @ qg
    steps = layer.steps
    if rest is None:
        if steps:
            return jax.vmap(_squares_one_step, in_axes=(0, 1))(ids, gq), ids
        return _squares_one_step(ids, gq), ids
    size, width = layer.d_in, gq.shape[-1]

    def dense(i, v):  # (T,), (K, T, d) -> (K, V, d)
        return jnp.zeros((v.shape[0], size, width), v.dtype).at[:, i].add(v, mode="drop")

    m = (jax.vmap(dense, in_axes=(0, 1), out_axes=1) if steps else dense)(ids, gq) + rest @ qg
    rows = jnp.broadcast_to(jnp.arange(size), (*ids.shape[:-1], size))
    return jnp.sum(m * m, axis=0), rows


__all__ = ["id_counts", "rotated_squares", "scatter_rows"]
