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
    """Per example: ``a`` ``(T, rows)`` and ``g`` ``(K, T, d_out)`` of a layer, sites concatenated."""
    a_parts, g_parts = [], []
    for site in layer.sites:
        a = site.inputs_matrix(records[site.sid]).astype(dtype)
        if layer.bias is not None:
            beta = 1.0 if (site.bias is not None and site.bias[0] == layer.bias) else 0.0
            a = jnp.concatenate([a, jnp.full((a.shape[0], 1), beta, dtype)], axis=1)
        a_parts.append(a)
        g_parts.append(jax.vmap(site.outputs_matrix)(pert_grads[site.sid]).astype(dtype))
    return jnp.concatenate(a_parts, axis=0), jnp.concatenate(g_parts, axis=1)


def rest_matrix(layer, diff_grads, dtype):
    """Per example: gradients of a layer's non-layer uses as ``(K, rows, d_out)``, or ``None``."""
    if layer.weight not in diff_grads and (layer.bias is None or layer.bias not in diff_grads):
        return None
    k = next(iter(jax.tree.leaves(diff_grads))).shape[0]
    w = diff_grads.get(layer.weight)
    wm = (
        jax.vmap(layer.canon.to_matrix)(w).astype(dtype)
        if w is not None
        else jnp.zeros((k, layer.d_in, layer.d_out), dtype)
    )
    if layer.bias is None:
        return wm
    b = diff_grads.get(layer.bias)
    row = jax.vmap(layer.bias_row)(b).astype(dtype) if b is not None else jnp.zeros((k, layer.d_out), dtype)
    return jnp.concatenate([wm, row[:, None, :]], axis=1)


def loss_tracer(loss_fn: Callable, params: PyTree, batch: PyTree, *, block_max_size: int = 0) -> Tracer:
    """The layers of ``loss_fn`` for the per-layer contraction (traced from shapes; fallback leaves diagonal).

    ``block_max_size`` only matters to K-FAC's fallback curvature; the
    contraction treats every fallback leaf through its per-example gradient.
    """
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), params)
    return trace_layers(loss_fn, shapes, batch, block_max_size=block_max_size)


__all__ = ["example_statistics", "layer_matrices", "loss_tracer", "rest_matrix"]
