"""Low-rank compression of the query factors, layer by layer, with the error it introduces.

Scoring many queries against a large corpus keeps every query's factor
``F_i = (C + λI)⁻¹ ∇θf(test_i)`` in memory and contracts each with every
training batch. Per tagged layer the factor is a ``(rows, d_out)`` matrix
(:meth:`jaxinf.layers.structures.Layer.to_matrix`); its truncated SVD
``F ≈ U_r S_r V_rᵀ`` keeps ``r (rows + d_out)`` numbers instead of
``rows · d_out``, and the layer's score becomes::

    ⟨U_r S_r V_rᵀ, Σ_t a_t g_tᵀ⟩ = Σ_t (a_tᵀ U_r) (S_r V_rᵀ g_t)

(Grosse et al. 2023, §3.2, "query batching" with low-rank query gradients;
kronfluence's ``query_gradient_low_rank``). Leaves outside every tagged
layer are kept exactly. Here the compressed factor is returned rebuilt,
``U_r S_r V_rᵀ`` in the factor's own layout, and scored by the ordinary
contractions: the scores are those of the factored form above, but the
memory and multiply-add savings of keeping ``(U_r, S_r V_rᵀ)`` are not
realised yet. The error is reported, not assumed away: the
relative Frobenius error ``‖F − F_r‖_F / ‖F‖_F`` of each compressed layer
factor (``(n_factors,)`` per layer, from the discarded singular values) and,
given a training batch, the change in the scores it produces.

References:
  Grosse et al., "Studying Large Language Model Generalization with Influence
  Functions", 2023.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxinf.layers import Tracer
from jaxinf.scoring.layerwise import contract_by_layer

PyTree = Any


class CompressionReport(NamedTuple):
    """What a rank-``r`` compression changed.

    Attributes:
      rank: the rank kept per layer factor (at most ``min(rows, d_out)``).
      layer_errors: ``{layer name: (n_factors,)}`` relative Frobenius errors
        ``‖F − F_r‖_F / ‖F‖_F`` (0 where the factor is 0); ``(n_factors, L)``
        for a layer stacked along a scan over ``L`` layers (one per step).
      max_error: the largest of them (a Python float).
      score_change: with a training batch, ``‖S_r − S‖_F / ‖S‖_F`` of the
        ``(n_factors, n)`` scores on it; else ``None``.
      max_score_change: with a training batch, ``max |S_r − S|``; else ``None``.
    """

    rank: int
    layer_errors: dict
    max_error: float
    score_change: float | None = None
    max_score_change: float | None = None


def check_rank(rank) -> int:
    """``rank`` as a positive Python int, else ``ValueError``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"query_rank must be a positive int (the rank kept per layer factor); got {rank!r}.")
    return rank


def _truncate(m, rank):
    """``(U_r S_r V_rᵀ, relative Frobenius error)`` of one ``(rows, d_out)`` matrix."""
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    r = min(rank, s.shape[0])
    low = (u[:, :r] * s[:r]) @ vt[:r]
    total = jnp.sum(s**2)
    err = jnp.sqrt(jnp.sum(s[r:] ** 2) / jnp.where(total > 0, total, 1.0))
    return low, err


def compress_layers(tracer: Tracer, factors: PyTree, rank: int):
    """``(compressed factors, {layer name: (n_factors,) relative errors})``; jittable (``rank`` static).

    The SVDs run one matrix at a time (``lax.map``): jaxlib's batched CPU
    LAPACK kernels can deadlock when two run at once.
    """
    leaves, treedef = jax.tree.flatten(factors)
    out = list(leaves)
    errors = {}
    for layer in tracer.tags.layers:
        fm = jax.vmap(lambda *ls, L=layer: L.to_matrix(list(ls)))(*leaves)  # (n, [L,] rows, d_out)
        flat = jnp.reshape(fm, (-1, *fm.shape[-2:]))  # a stacked layer: each step's matrix on its own
        low, err = jax.lax.map(lambda m: _truncate(m, rank), flat)
        low, err = jnp.reshape(low, fm.shape), jnp.reshape(err, fm.shape[:-2])
        w, b = jax.vmap(lambda m, L=layer: L.from_matrix(m, None if L.bias is None else leaves[L.bias].shape[1:]))(low)
        out[layer.weight] = w.astype(leaves[layer.weight].dtype)
        if layer.bias is not None:
            out[layer.bias] = b.astype(leaves[layer.bias].dtype)
        errors[layer.name] = err
    return jax.tree.unflatten(treedef, out), errors


_compress = jax.jit(compress_layers, static_argnums=(0, 2))
_scores = jax.jit(
    lambda tracer, params, factors, batch: sum(contract_by_layer(tracer, params, factors, batch).values()),
    static_argnums=0,
)


def compress_factors(
    tracer: Tracer, factors: PyTree, rank: int, *, params: PyTree = None, batch: PyTree = None
) -> tuple[PyTree, CompressionReport]:
    """Compress every tagged layer's query factor to rank ``rank`` and report the error.

    Args:
      tracer: :func:`jaxinf.layers.statistics.loss_tracer` of the training loss
        (its layers define the ``(rows, d_out)`` matrices).
      factors: params-shaped leaves with a leading ``n_factors`` axis.
      rank: the rank kept per layer factor; ``min(rows, d_out)`` or more is
        exact (up to rounding).
      params, batch: optional; with both, the report carries the change in
        the scores on ``batch`` (:func:`jaxinf.scoring.layerwise.contract_by_layer`).

    Returns:
      ``(compressed, report)``: ``compressed`` params-shaped like ``factors``
      with each layer factor replaced by ``U_r S_r V_rᵀ``;
      :class:`CompressionReport`.

    Raises:
      ValueError: ``rank`` not a positive int; only one of ``params`` and ``batch``.
    """
    rank = check_rank(rank)
    if (params is None) != (batch is None):
        raise ValueError("Pass both params and batch (to report the change in scores on batch), or neither.")
    compressed, errors = _compress(tracer, factors, rank)
    max_error = max((float(jnp.max(e)) for e in errors.values()), default=0.0)
    report = CompressionReport(rank, errors, max_error)
    if batch is not None:
        exact, approx = _scores(tracer, params, factors, batch), _scores(tracer, params, compressed, batch)
        norm = float(jnp.linalg.norm(exact))
        diff = approx - exact
        change = float(jnp.linalg.norm(diff)) / norm if norm > 0 else float(jnp.linalg.norm(diff))
        report = report._replace(score_change=change, max_score_change=float(jnp.max(jnp.abs(diff))))
    return compressed, report


__all__ = ["CompressionReport", "check_rank", "compress_factors", "compress_layers"]
