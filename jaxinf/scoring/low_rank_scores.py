"""Scoring with rank-``r`` query factors kept factored: ``Σ_t (a_tᵀ U_r)(S_r V_rᵀ g_t)`` per layer.

:func:`low_rank_factors` splits each tagged layer's query factor ``F`` (its
``(rows, d_out)`` matrix) by truncated SVD into ``U_r`` ``(rows, r)`` and
``S_r V_rᵀ`` ``(r, d_out)``; :func:`contract_low_rank` scores them against a
training batch without rebuilding ``F``::

    ⟨U_r S_r V_rᵀ, Σ_t a_t g_tᵀ⟩ = Σ_t (a_tᵀ U_r) · (S_r V_rᵀ g_t)

``r (rows + d_out)`` multiply-adds per location and factor instead of
``rows · d_out`` (Grosse et al. 2023, §3.2; kronfluence's low-rank query
gradients). An embedding (one-hot inputs) gathers the rows ``U_r[id_t]``.
Leaves outside every tagged layer, and the non-layer uses of tagged weights,
are scored exactly (their factor kept whole). The scores equal those of
:func:`jaxinf.scoring.query_compression.compress_factors`' rebuilt factors.

References:
  Grosse et al., "Studying Large Language Model Generalization with Influence
  Functions", 2023.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxinf.core.data import add_example_axis
from jaxinf.layers import Tracer
from jaxinf.layers.statistics import example_statistics, layer_ids, layer_matrices, layer_output_grads, rest_matrix
from jaxinf.scoring.layerwise import fallback_scores
from jaxinf.scoring.query_compression import check_rank

PyTree = Any


class LowRankFactors(NamedTuple):
    """Query factors with each tagged layer's matrix kept as ``U_r`` and ``S_r V_rᵀ``.

    Attributes:
      left: ``{layer name: (n_factors, [L,] rows, r)}``, ``U_r``.
      right: ``{layer name: (n_factors, [L,] r, d_out)}``, ``S_r V_rᵀ``.
      whole: the factors as given (params-shaped): read only for the leaves
        outside every tagged layer and for non-layer uses of tagged weights.
    """

    left: dict
    right: dict
    whole: PyTree


def _split(m, rank):
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    r = min(rank, s.shape[0])
    return u[:, :r], s[:r, None] * vt[:r]


def low_rank_factors(tracer: Tracer, factors: PyTree, rank: int) -> LowRankFactors:
    """Split every tagged layer's factor matrix into ``U_r``, ``S_r V_rᵀ`` (one SVD per matrix, ``lax.map``).

    ``rank`` is a Python int (static under ``jit``); ``min(rows, d_out)`` or
    more keeps every matrix exactly.
    """
    rank = check_rank(rank)
    leaves = jax.tree.leaves(factors)
    left, right = {}, {}
    for layer in tracer.tags.layers:
        fm = jax.vmap(lambda *ls, L=layer: L.to_matrix(list(ls)))(*leaves)  # (n, [L,] rows, d_out)
        u, v = jax.lax.map(lambda m: _split(m, rank), jnp.reshape(fm, (-1, *fm.shape[-2:])))
        left[layer.name] = jnp.reshape(u, (*fm.shape[:-1], u.shape[-1]))
        right[layer.name] = jnp.reshape(v, (*fm.shape[:-2], v.shape[-2], fm.shape[-1]))
    return LowRankFactors(left, right, factors)


def contract_low_rank(tracer: Tracer, params: PyTree, low: LowRankFactors, batch: PyTree, *, dtype=None) -> dict:
    """``{layer or leaf name: (n_factors, n)}`` scores of :class:`LowRankFactors` against ``batch``.

    As :func:`jaxinf.scoring.layerwise.contract_by_layer` (same keys), with
    each layer contracted through its factored matrix (module docstring).
    """
    params_leaves = jax.tree.leaves(params)
    w_leaves = jax.tree.leaves(low.whole)
    n_factors = w_leaves[0].shape[0]
    dtype = jnp.result_type(*w_leaves) if dtype is None else dtype
    ones = lambda outs, b1: ([jnp.ones((1, *o.shape), o.dtype) for o in outs], 1)  # noqa: E731
    stats = jax.vmap(lambda ex: example_statistics(tracer, params_leaves, add_example_axis(ex), ones))
    records, pert, diff = stats(batch)
    out = {}
    for layer in tracer.tags.layers:
        u, v = low.left[layer.name].astype(dtype), low.right[layer.name].astype(dtype)
        if layer.one_hot_inputs:
            first, g = jax.vmap(lambda r, p, L=layer: (layer_ids(L, r), layer_output_grads(L, p, dtype)))(records, pert)
            step = _id_step
        else:
            first, g = jax.vmap(lambda r, p, L=layer: layer_matrices(L, r, p, dtype))(records, pert)
            step = _matrix_step
        if layer.steps:
            s = jnp.sum(jax.vmap(step, in_axes=(1, 1, 1, 1))(first, g[:, 0], u, v), axis=0)
        else:
            s = step(first, g[:, 0], u, v)
        if layer.weight in diff or (layer.bias is not None and layer.bias in diff):
            fm = jnp.einsum("f...ir,f...ro->f...io", u, v)
            rest = jax.vmap(lambda d, L=layer: rest_matrix(L, d, dtype))(diff)
            s = s + jnp.einsum("f...io,n...io->fn", fm, rest[:, 0])
        out[layer.name] = s
    out.update(fallback_scores(tracer, w_leaves, diff, n_factors, dtype))
    return out


def _matrix_step(a, g, u, v):
    """``Σ_t (a_tᵀ U)(V g_t)`` from ``a`` ``(n, T, rows)``, ``g`` ``(n, T, d_out)``, ``U`` ``(F, rows, r)``, ``V``
    ``(F, r, d_out)``: ``(F, n)``."""
    return jnp.einsum("ntfk,ntfk->fn", jnp.einsum("nti,fik->ntfk", a, u), jnp.einsum("nto,fko->ntfk", g, v))


def _id_step(ids, g, u, v):
    """``Σ_t U[id_t] · (V g_t)`` for one-hot inputs (id ``V``: no row read, a zero row)."""
    rows = jnp.take(u, ids, axis=1, mode="fill", fill_value=0)  # (F, n, T, r)
    return jnp.einsum("fntk,ntfk->fn", rows, jnp.einsum("nto,fko->ntfk", g, v))


__all__ = ["LowRankFactors", "contract_low_rank", "low_rank_factors"]
