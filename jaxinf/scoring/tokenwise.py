"""Token-wise influence: the share of each training token (sequence position) in each influence score.

For a tagged layer ``s_t = W a_t`` applied at the locations ``t`` of a
training sequence, the per-layer contraction of :mod:`jaxinf.scoring.layerwise`
is a sum over locations::

    ⟨F_i, ∇_W ℓ_j⟩ = Σ_t (a_{jt}ᵀ F_i) · g_{jt}

and the term of location ``t`` is the derivative of ``F_iᵀ`` times the
training loss with respect to a copy ``W_t = W + δ_t`` of the weights used
only at ``t``: ``(a_{jt}ᵀ F_i) g_{jt} = F_iᵀ ∂ℓ_j/∂δ_t`` at ``δ = 0``. Summed
over the locations that read sequence position ``p`` (heads of an
attention projection, every layer of a scanned stack) it is the share of
token ``p``: ``by_token[i, j, p]``. No per-token gradient is formed: one
recorded forward pass and one backward pass to the layer outputs serve every
factor and every position (Grosse et al. 2023, §5.3 "token-wise
attributions", which splits the layer-wise score the same way).

Parameters outside every tagged layer (norm scales, fallback leaves) and the
non-layer uses of tagged weights enter the loss at no single location: their
part of the score is returned whole, as ``unattributed``, so that
``by_token.sum(-1) + unattributed`` is the influence matrix.

Which location reads which position comes from
:func:`jaxinf.scoring.positions.token_map` (the sequence axis the user names,
followed through the traced loss).

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
from jaxinf.scoring.positions import TokenMap, token_map

PyTree = Any


class TokenScores(NamedTuple):
    """Token-wise scores: ``by_token`` ``(n_factors, n, T)`` and ``unattributed`` ``(n_factors, n)``.

    ``by_token.sum(-1) + unattributed`` is ``factorsᵀ ∇θℓ(z_j)``.
    """

    by_token: jax.Array
    unattributed: jax.Array


def _statistics(tracer: Tracer, params_leaves, batch):
    ones = lambda outs, b1: ([jnp.ones((1, *o.shape), o.dtype) for o in outs], 1)  # noqa: E731
    return jax.vmap(lambda example: example_statistics(tracer, params_leaves, add_example_axis(example), ones))(batch)


def contract_by_token(
    tracer: Tracer, tokens: TokenMap, params: PyTree, factors: PyTree, batch: PyTree, *, dtype=None
) -> TokenScores:
    """Scores of ``factors`` against ``batch`` split over the training tokens (see the module docstring).

    Args:
      tracer: :func:`jaxinf.layers.statistics.loss_tracer` of the training loss.
      tokens: :func:`jaxinf.scoring.positions.token_map` of the tracer and the
        batch's shapes.
      params: the parameters.
      factors: params-shaped leaves with a leading ``n_factors`` axis.
      batch: the training batch.
      dtype: the dtype of the contraction (default: the factors').

    Returns:
      :class:`TokenScores`: ``by_token`` ``(n_factors, n, T)`` and
      ``unattributed`` ``(n_factors, n)``.

    Raises:
      ValueError: a convolution layer contracted natively with positions (not
        supported), or ``tokens`` from another tracer.
    """
    if len(tokens.positions) != len(tracer.tags.layers):
        raise ValueError("tokens was built for another tracer: pass token_map(tracer, params, batch, sequence_axis).")
    params_leaves = jax.tree.leaves(params)
    f_leaves = jax.tree.leaves(factors)
    n_factors = f_leaves[0].shape[0]
    dtype = jnp.result_type(*f_leaves) if dtype is None else dtype
    records, pert, diff = _statistics(tracer, params_leaves, batch)
    n = jax.tree.leaves(batch)[0].shape[0]
    by_token = jnp.zeros((n_factors, n, tokens.length), dtype)
    rest = jnp.zeros((n_factors, n), dtype)
    for layer, pos in zip(tracer.tags.layers, tokens.positions):
        fm = jax.vmap(lambda *ls, L=layer: L.to_matrix(list(ls)))(*[x.astype(dtype) for x in f_leaves])
        onehot = jax.nn.one_hot(jnp.asarray(pos), tokens.length, dtype=dtype)  # ([L,] locations, T)
        if layer.one_hot_inputs:  # an embedding: F[id_t] · g_t, a gather of factor rows
            ids, g = jax.vmap(lambda r, p, L=layer: (layer_ids(L, r), layer_output_grads(L, p, dtype)))(records, pert)
            step, first = _id_location_scores, ids
        else:
            first, g = jax.vmap(lambda r, p, L=layer: layer_matrices(L, r, p, dtype))(records, pert)
            step = _location_scores
        if layer.steps:  # stacked along a scan over layers: every step's locations
            per_loc = jax.vmap(step, in_axes=(1, 1, 1), out_axes=2)(first, g[:, 0], fm)  # (F, n, L, locations)
            by_token = by_token + jnp.einsum("fnlt,ltp->fnp", per_loc, onehot)
        else:
            by_token = by_token + step(first, g[:, 0], fm) @ onehot
        if layer.weight in diff or (layer.bias is not None and layer.bias in diff):
            rm = jax.vmap(lambda d, L=layer: rest_matrix(L, d, dtype))(diff)
            rest = rest + jnp.einsum("f...io,n...io->fn", fm, rm[:, 0])
    for fb in tracer.tags.fallbacks:
        x = jnp.reshape(f_leaves[fb.leaf], (n_factors, -1)).astype(dtype)
        d = diff[fb.leaf][:, 0]
        rest = rest + x @ jnp.reshape(d, (d.shape[0], -1)).astype(dtype).T
    return TokenScores(by_token, rest)


def _id_location_scores(ids, g, fm):
    """``F_f[id_t] · g_t`` as ``(n_factors, n, locations)`` from ids ``(n, locations)`` (``V``: no row read)."""
    return jnp.einsum("fnto,nto->fnt", jnp.take(fm, ids, axis=1, mode="fill", fill_value=0), g)


def _location_scores(a, g, fm):
    """``(a_tᵀ F_f) g_t`` as ``(n_factors, n, locations)``: one GEMM over the smaller side."""
    n, t_loc, rows = a.shape
    n_factors, _, d_out = fm.shape
    if d_out <= rows:
        af = jnp.reshape(a, (n * t_loc, rows)) @ jnp.reshape(jnp.moveaxis(fm, 0, 1), (rows, -1))
        per_loc = jnp.einsum("ntfo,nto->fnt", jnp.reshape(af, (n, t_loc, n_factors, d_out)), g)
    else:
        gf = jnp.reshape(g, (n * t_loc, d_out)) @ jnp.reshape(jnp.moveaxis(fm, 2, 0), (d_out, -1))
        per_loc = jnp.einsum("ntfi,nti->fnt", jnp.reshape(gf, (n, t_loc, n_factors, rows)), a)
    return per_loc


def tokenwise_scores(tracer: Tracer, params: PyTree, factors: PyTree, batch: PyTree, *, sequence_axis) -> TokenScores:
    """:func:`contract_by_token` with the token map built from ``batch`` (outside ``jit``)."""
    return contract_by_token(tracer, token_map(tracer, params, batch, sequence_axis), params, factors, batch)


__all__ = ["TokenScores", "contract_by_token", "tokenwise_scores"]
