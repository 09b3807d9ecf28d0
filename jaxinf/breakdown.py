"""Influence scores broken down: by layer (every solver) and by training token (sequence models).

Both start from the query factors ``F_i = (C + λI)⁻¹ ∇θf(test_i)`` of any
fitted :class:`~jaxinf.InfluenceModel` (``model.influence_factors``, ``f``
the loss or a ``measurement``), and contract them with the training data
layer by layer (:mod:`jaxinf.scoring.layerwise`): one recorded forward pass
and one backward pass to the layer outputs per training batch, shared by all
factors.

* :func:`influences_by_layer`: ``{layer or leaf name: (n_test, n_train)}``,
  summing to ``model.influences(test, train, measurement=f)``.
* :func:`influences_by_token`: the share of each training token,
  ``by_token`` ``(n_test, n_train, T)``, and the part of the score no token
  owns (norm scales and other parameters outside every tagged layer),
  ``unattributed`` ``(n_test, n_train)``; ``by_token.sum(-1) + unattributed``
  is the influence matrix (:mod:`jaxinf.scoring.tokenwise`).

Both take one batch or a list (iterable) of batches on each side; every
batch is scored, rows in test order and columns in training order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.data import checked_list
from jaxinf.layers.statistics import loss_tracer
from jaxinf.scoring.layerwise import contract_by_layer
from jaxinf.scoring.low_rank_scores import contract_low_rank, low_rank_factors
from jaxinf.scoring.positions import token_map
from jaxinf.scoring.query_compression import check_rank, compress_factors
from jaxinf.scoring.tokenwise import TokenScores, contract_by_token

PyTree = Any
_by_layer = jax.jit(contract_by_layer, static_argnums=0)
_by_token = jax.jit(contract_by_token, static_argnums=(0, 1))
_by_layer_low = jax.jit(contract_low_rank, static_argnums=0)
_split = jax.jit(low_rank_factors, static_argnums=(0, 2))
_TRACERS: dict = {}  # the most recent few (a tracer holds the loss's jaxpr and its constants)
_TOKEN_MAPS: dict = {}
_KEEP = 8


def _remember(cache: dict, key, make):
    if key not in cache:
        while len(cache) >= _KEEP:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]


def _shape_key(tree) -> tuple:
    return jax.tree.structure(tree), tuple((np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree))


def training_tracer(loss_fn: Callable, params: PyTree, batch: PyTree):
    """The loss's :func:`~jaxinf.layers.statistics.loss_tracer`, traced once per loss, parameter and example shape."""
    example = jax.tree.map(lambda x: x[:1], batch)
    key = (loss_fn, _shape_key(params), _shape_key(example))
    return _remember(_TRACERS, key, lambda: loss_tracer(loss_fn, params, batch))


def _factors(model, test_data, measurement, query_rank):
    """The query factors; with ``query_rank``, compressed (:mod:`jaxinf.scoring.query_compression`)."""
    test_data = checked_list(test_data, name="test_data")  # read once: a generator is read again for its first batch
    factors = model.influence_factors(test_data, measurement=measurement)
    if query_rank is None:
        return factors
    first = test_data[0]
    compressed, _ = compress_factors(training_tracer(model.loss_fn, model.params, first), factors, query_rank)
    return compressed


def influences_by_layer(
    model, test_data: Any, train_data: Any, *, measurement: Callable | None = None, query_rank: int | None = None
) -> dict:
    """``{layer or leaf name: (n_test, n_train)}`` with ``Σ_names = model.influences(test, train, measurement=f)``.

    Each entry is ``Σ_{θ in the layer} F_i[θ] ∇_θℓ(train_j)``: the part of the
    influence carried by that layer's parameters (a fallback leaf, a norm
    scale, is its own entry, keyed by its path). Works for every solver: the
    factors are ``model.influence_factors(test_data, measurement=f)``.

    Args:
      model: a fitted :class:`~jaxinf.InfluenceModel` (any solver).
      test_data, train_data: one batch or a list (iterable) of batches each.
      measurement: ``f(params, batch) -> scalar mean`` on the test side
        (default: the loss), as for ``model.influences``.
      query_rank: score each layer's query factor at this rank, kept
        factored (:mod:`jaxinf.scoring.low_rank_scores`; the error it adds:
        :func:`jaxinf.scoring.query_compression.compress_factors`' report);
        default ``None``: exact.

    Raises:
      NotFittedError: the model is not fitted. ValueError: as
        ``model.influence_factors`` for bad test data or measurement.
    """
    factors = model.influence_factors(test_data, measurement=measurement)
    columns, low = [], None
    for batch in checked_list(train_data, name="train_data"):
        tracer = training_tracer(model.loss_fn, model.params, batch)
        if query_rank is None:
            columns.append(_by_layer(tracer, model.params, factors, batch))
            continue
        low = _split(tracer, factors, check_rank(query_rank)) if low is None else low
        columns.append(_by_layer_low(tracer, model.params, low, batch))
    return {name: jnp.concatenate([c[name] for c in columns], axis=1) for name in columns[0]}


def influences_by_token(
    model,
    test_data: Any,
    train_data: Any,
    *,
    sequence_axis,
    measurement: Callable | None = None,
    query_rank: int | None = None,
) -> TokenScores:
    """The influence of each training token on each query: ``by_token`` ``(n_test, n_train, T)`` and the rest.

    ``by_token[i, j, p] = Σ_l Σ_{t at p} (a_{jt}ᵀ F_i^l) g_{jt}``: the share of
    token ``p`` of training sequence ``j`` in the influence on query ``i``
    (:mod:`jaxinf.scoring.tokenwise`); ``unattributed[i, j]`` is the part of
    parameters outside every tagged layer (norm scales, fallback leaves) and
    of non-layer uses of tagged weights, which no token owns. Their sum
    ``by_token.sum(-1) + unattributed`` is ``model.influences(test, train,
    measurement=f)``.

    Args:
      model: a fitted :class:`~jaxinf.InfluenceModel` (any solver).
      test_data, train_data: one batch or a list (iterable) of batches each;
        the training batches share one sequence length.
      sequence_axis: the sequence axis of the training batch leaves (the
        example axis is 0): an int for every leaf, or one int or ``None`` per
        leaf in ``jax.tree.leaves`` order (:func:`jaxinf.scoring.positions.token_map`).
      measurement: ``f(params, batch) -> scalar mean`` on the test side.
      query_rank: compress each layer's query factor to this rank first
        (:func:`jaxinf.scoring.query_compression.compress_factors`, rebuilt
        ``U_r S_r V_rᵀ``); default ``None``: exact.

    Returns:
      :class:`jaxinf.scoring.tokenwise.TokenScores` ``(by_token, unattributed)``.

    Raises:
      ValueError: a bad ``sequence_axis``; a layer whose locations do not each
        read one sequence position (named); training batches of different
        sequence lengths.
    """
    factors = _factors(model, test_data, measurement, query_rank)
    parts = []
    for batch in checked_list(train_data, name="train_data"):
        tracer = training_tracer(model.loss_fn, model.params, batch)
        make = functools.partial(token_map, tracer, model.params, batch, sequence_axis)
        tokens = _remember(_TOKEN_MAPS, (tracer, repr(sequence_axis)), make)
        parts.append(_by_token(tracer, tokens, model.params, factors, batch))
    lengths = {p.by_token.shape[-1] for p in parts}
    if len(lengths) > 1:
        raise ValueError(f"The training batches have different sequence lengths {sorted(lengths)}; pad them to one.")
    return TokenScores(*(jnp.concatenate(xs, axis=1) for xs in zip(*parts)))


__all__ = ["influences_by_layer", "influences_by_token", "training_tracer"]
