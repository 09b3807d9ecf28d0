"""Per-layer statistics of one example: layer inputs, output gradients, the gradients of non-layer uses.

For a tagged layer ``s_t = W a_t`` (bias as an appended 1 in ``a_t``; ``t``
over the ``T`` locations of the layer: convolution positions, scan steps,
shared uses), one forward pass records the inputs ``a_t`` and one backward
pass to the layer outputs gives ``g_t = ∂ℓ/∂s_t``; the per-example weight
gradient is then ``Σ_t a_t g_tᵀ`` (Martens & Grosse 2015). K-FAC's factors
and the per-layer scoring contraction are both built from these.

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature", ICML 2015.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.layers.tracer import Tracer, trace_layers

PyTree = Any


def example_statistics(tracer: Tracer, params_leaves, batch1, cotangent_fn):
    """Layer inputs, output gradients and rest-gradients for one example.

    Args:
      tracer: from :func:`jaxinf.layers.trace_layers`.
      params_leaves: the parameter leaves.
      batch1: a batch of one example.
      cotangent_fn: ``(outs, batch1) -> (cotangents with leading K, K)``.

    Returns:
      ``(records, pert_grads, diff_grads)``: ``records[sid]`` the input of
      site ``sid``; ``pert_grads[sid]`` ``(K, ...)`` output gradients;
      ``diff_grads[leaf]`` ``(K, ...)`` gradients of the non-layer uses.
    """
    diff0 = {i: params_leaves[i] for i in tracer.diff_leaves}
    perts0 = tracer.zero_perts()

    def f(diff, perts):
        return tracer.run(params_leaves, diff, perts, batch1)

    outs, vjp_fn, records = jax.vjp(f, diff0, perts0, has_aux=True)
    cots, _ = cotangent_fn(outs, batch1)
    diff_grads, pert_grads = jax.vmap(vjp_fn)(cots)
    return records, pert_grads, diff_grads


def layer_matrices(layer, records, pert_grads, dtype):
    """Per example: ``a`` ``(T, rows)`` and ``g`` ``(K, T, d_out)`` of a layer, sites concatenated.

    A layer stacked along a ``lax.scan`` (``layer.steps = L``) gives ``a`` ``(L, T, rows)`` and ``g``
    ``(K, L, T, d_out)``: step ``l``'s inputs and output gradients, ``T`` the locations of one step.
    """
    a_parts = []
    for site in layer.sites:
        a = site.inputs_matrix(records[site.sid]).astype(dtype)
        if layer.bias is not None:
            beta = 1.0 if (site.bias is not None and site.bias[0] == layer.bias) else 0.0
            a = jnp.concatenate([a, jnp.full((*a.shape[:-1], 1), beta, dtype)], axis=-1)
        a_parts.append(a)
    return jnp.concatenate(a_parts, axis=-2), layer_output_grads(layer, pert_grads, dtype)


def layer_output_grads(layer, pert_grads, dtype):
    """Per example: the output gradients ``g`` ``(K, [L,] T, d_out)`` of a layer, sites concatenated."""
    parts = [jax.vmap(site.outputs_matrix)(pert_grads[site.sid]).astype(dtype) for site in layer.sites]
    return jnp.concatenate(parts, axis=-2)


def layer_ids(layer, records):
    """Per example, for a layer with one-hot inputs (:attr:`~jaxinf.layers.Layer.one_hot_inputs`): the id read
    at each location, ``([L,] T)`` in the location order of :func:`layer_matrices` (``d_in``: no row read).

    ``a_t = onehot(id_t)``, so ``Σ_t a_t g_tᵀ`` is a scatter-add of the rows ``g_t`` at ``id_t`` and
    ``⟨F, Σ_t a_t g_tᵀ⟩ = Σ_t F[id_t] · g_t`` a gather: no ``(T, d_in)`` one-hot matrix is needed.
    """
    return jnp.concatenate([site.input_ids(records[site.sid]) for site in layer.sites], axis=-1)


def rest_matrix(layer, diff_grads, dtype):
    """Per example: gradients of a layer's non-layer uses as ``(K, [L,] rows, d_out)``, or ``None``."""
    if layer.weight not in diff_grads and (layer.bias is None or layer.bias not in diff_grads):
        return None
    k = next(iter(jax.tree.leaves(diff_grads))).shape[0]
    shape = layer.canon.matrix_shape
    w = diff_grads.get(layer.weight)
    wm = jax.vmap(layer.canon.to_matrix)(w).astype(dtype) if w is not None else jnp.zeros((k, *shape), dtype)
    if layer.bias is None:
        return wm
    b = diff_grads.get(layer.bias)
    row = jax.vmap(layer.bias_row)(b).astype(dtype) if b is not None else jnp.zeros((k, *shape[:-2], shape[-1]), dtype)
    return jnp.concatenate([wm, row[..., None, :]], axis=-2)


def loss_tracer(loss_fn: Callable, params: PyTree, batch: PyTree, *, block_max_size: int = 0) -> Tracer:
    """The layers of ``loss_fn`` for the per-layer contraction (traced from shapes; fallback leaves diagonal).

    ``block_max_size`` only matters to K-FAC's fallback curvature; the
    contraction treats every fallback leaf through its per-example gradient.
    """
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), params)
    return trace_layers(loss_fn, shapes, batch, block_max_size=block_max_size)


__all__ = ["example_statistics", "layer_ids", "layer_matrices", "layer_output_grads", "loss_tracer", "rest_matrix"]
