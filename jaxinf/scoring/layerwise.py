"""Per-layer statistics and the per-layer contraction of influence factors.

For a tagged layer ``s_t = W a_t`` (bias as an appended 1 in ``a_t``, ``t``
over the ``T`` locations of the layer: convolution positions, scan steps,
shared uses), the per-example gradient of the weights is a sum of ``T``
outer products, ``∇_W ℓ_j = Σ_t a_{jt} g_{jt}ᵀ`` with ``g`` the gradient of
the loss with respect to the layer output. So the influence term of one
layer needs neither the gradient of the whole model nor, for ``T = 1``, the
per-example gradient of the layer::

    ⟨F_i, ∇_W ℓ_j⟩ = Σ_t (a_{jt}ᵀ F_i) · g_{jt}            (F_i: factor i as a matrix)

One forward pass that records the layer inputs ``a`` and one backward pass
to the layer outputs ``g`` (never to the weights) serve every factor; what
remains is, per layer, either the direct contraction above (``F T`` products
of size ``rows × d_out`` per example) or, when that is dearer, the
per-example layer gradient ``Σ_t a_t g_tᵀ`` (``T`` products) contracted
with all factors (``F``) — whichever has fewer multiply-adds. A convolution
(outside ``lax.scan``) never builds im2col patches: the direct contraction is
the layer's own convolution of the recorded input with the factors as
kernels, and its per-example gradient the kernel gradient of that
convolution, as backpropagation forms it. Leaves outside
any layer (fallbacks of :mod:`jaxinf.layers`) and the non-layer uses of
tagged weights contribute through their ordinary per-example gradients.

This is the "per-layer contraction" scoring method of :mod:`jaxinf.scoring`
and the training-side score of :func:`jaxinf.ekfac` (the factorisation of
per-example gradients follows Grosse et al. 2023, §3.2 and kronfluence's
low-rank query gradients; the layer statistics are those of K-FAC, Martens &
Grosse 2015).

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature", ICML 2015. Grosse et al., "Studying Large Language
  Model Generalization with Influence Functions", 2023.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxinf.core.data import add_example_axis
from jaxinf.layers import Tracer
from jaxinf.layers.statistics import example_statistics, layer_ids, layer_matrices, layer_output_grads, rest_matrix
from jaxinf.scoring.cost_model import LayerProfile, direct_is_cheaper

PyTree = Any


def _one_example_gradient(tracer: Tracer, params_leaves, batch):
    ones = lambda outs, b1: ([jnp.ones((1, *o.shape), o.dtype) for o in outs], 1)  # noqa: E731
    return jax.vmap(lambda example: example_statistics(tracer, params_leaves, add_example_axis(example), ones))(batch)


def contract_by_layer(tracer: Tracer, params: PyTree, factors: PyTree, batch: PyTree, *, dtype=None) -> dict:
    """``{layer or leaf name: (n_factors, n_batch)}`` with ``Σ_names = factorsᵀ ∇θℓ(z_j)``.

    Computes ``I[i, j] = Σ_l ⟨F_i^l, ∇_l ℓ(z_j)⟩`` layer by layer (see the
    module docstring) from one recorded forward pass and one backward pass to
    the layer outputs over ``batch``, for every factor at once.

    Args:
      tracer: :func:`jaxinf.layers.trace_layers` of the loss
        ``loss_fn(params, batch) -> mean loss``.
      params: the parameters.
      factors: params-shaped leaves with a leading ``n_factors`` axis.
      batch: the training batch.
      dtype: the dtype of the contraction (default: the factors').

    Returns:
      A dict keyed by the layer names of ``tracer.tags`` and the paths of
      fallback leaves.
    """
    params_leaves = jax.tree.leaves(params)
    f_leaves = jax.tree.leaves(factors)
    n_factors = f_leaves[0].shape[0]
    dtype = jnp.result_type(*f_leaves) if dtype is None else dtype
    records, pert, diff = _one_example_gradient(tracer, params_leaves, batch)
    out = {}
    for layer in tracer.tags.layers:
        fm = jax.vmap(lambda *ls, L=layer: L.to_matrix(list(ls)))(*[x.astype(dtype) for x in f_leaves])
        if layer.one_hot_inputs:
            s = _id_scores(layer, records, pert, fm, dtype)
        elif native_conv(layer):
            s = sum(_conv_site_scores(layer, site, records, pert, fm, dtype) for site in layer.sites)
        else:
            s = _matrix_scores(layer, records, pert, fm, dtype)
        if layer.weight in diff or (layer.bias is not None and layer.bias in diff):
            rest = jax.vmap(lambda d, L=layer: rest_matrix(L, d, dtype))(diff)
            s = s + jnp.einsum("f...io,n...io->fn", fm, rest[:, 0])
        out[layer.name] = s
    out.update(fallback_scores(tracer, f_leaves, diff, n_factors, dtype))
    return out


def fallback_scores(tracer: Tracer, f_leaves, diff, n_factors: int, dtype) -> dict:
    """``{path: (n_factors, n)}``: each fallback leaf's factors against its per-example gradients ``diff``."""
    out = {}
    for fb in tracer.tags.fallbacks:
        x = jnp.reshape(f_leaves[fb.leaf], (n_factors, -1)).astype(dtype)
        d = diff[fb.leaf][:, 0]
        out[tracer.tags.paths[fb.leaf]] = x @ jnp.reshape(d, (d.shape[0], -1)).astype(dtype).T
    return out


def _matrix_scores(layer, records, pert, fm, dtype):
    """``(n_factors, n)`` scores of a layer from its ``(T, rows)`` inputs and ``(T, d_out)`` output gradients.

    A layer stacked along a scan (``fm`` ``(F, L, rows, d_out)``): the sum over its steps of each step's scores.
    """
    a, g = jax.vmap(lambda r, p: layer_matrices(layer, r, p, dtype))(records, pert)
    g = g[:, 0]  # (n, [L,] T, d_out)
    if layer.steps:
        per_step = jax.vmap(_step_scores, in_axes=(1, 1, 1))(a, g, fm)
        return jnp.sum(per_step, axis=0)
    return _step_scores(a, g, fm)


def _id_scores(layer, records, pert, fm, dtype):
    """``(n_factors, n)`` scores of a layer with one-hot inputs: ``Σ_t F[id_t] · g_t``, a gather of factor rows."""
    ids, g = jax.vmap(lambda r, p: (layer_ids(layer, r), layer_output_grads(layer, p, dtype)))(records, pert)
    g = g[:, 0]  # (n, [L,] T, d_out)

    def one(i, gs, f):  # (n, T), (n, T, d_out), (F, V, d_out); id V (no row read) gathers zeros
        return jnp.einsum("fnto,nto->fn", jnp.take(f, i, axis=1, mode="fill", fill_value=0), gs)

    if layer.steps:
        return jnp.sum(jax.vmap(one, in_axes=(1, 1, 1))(ids, g, fm), axis=0)
    return one(ids, g, fm)


def _step_scores(a, g, fm):
    """``(n_factors, n)`` from ``a`` ``(n, T, rows)``, ``g`` ``(n, T, d_out)``, ``fm`` ``(F, rows, d_out)``."""
    n_factors = fm.shape[0]
    n, t_loc, rows = a.shape
    d_out = g.shape[-1]
    if not direct_is_cheaper(n_factors, rows, d_out, t_loc):
        per_example = jnp.einsum("nti,nto->nio", a, g)
        return jnp.reshape(fm, (n_factors, -1)) @ jnp.reshape(per_example, (n, -1)).T
    # never form the per-example gradient: one (n T, ·) GEMM with all factors side by side, then a reduction
    # over the smaller side
    if d_out <= rows:
        af = jnp.reshape(a, (n * t_loc, rows)) @ jnp.reshape(jnp.moveaxis(fm, 0, 1), (rows, -1))
        return jnp.einsum("ntfo,nto->fn", jnp.reshape(af, (n, t_loc, n_factors, d_out)), g)
    gf = jnp.reshape(g, (n * t_loc, d_out)) @ jnp.reshape(jnp.moveaxis(fm, 2, 0), (d_out, -1))
    return jnp.einsum("ntfi,nti->fn", jnp.reshape(gf, (n, t_loc, n_factors, rows)), a)


def native_conv(layer) -> bool:
    """Whether a layer is contracted with its own convolution (every site a convolution outside ``lax.scan``)."""
    return all(site.kind == "conv" and not site.stack for site in layer.sites)


def _conv_site_scores(layer, site, records, pert, fm, dtype):
    """``(n_factors, n)`` scores of one convolution site without im2col patches.

    Direct: the site's convolution of the recorded input with every factor as
    kernel (``F d_out`` output channels at once), times the output gradient,
    summed over positions. Per-example: the kernel gradient of the site's
    convolution (a convolution of the input with the output gradient, as in
    backpropagation), then one product with the factors. Whichever has fewer
    multiply-adds (:func:`jaxinf.scoring.cost_model.direct_is_cheaper`).
    """
    c = site.conv
    n_factors, rows, d_out = fm.shape
    d_in = layer.d_in
    x = records[site.sid].astype(dtype)  # (n, *x_shape), the example axis of size 1 inside
    g = pert[site.sid][:, 0].astype(dtype)  # (n, *out_shape)
    n = x.shape[0]
    xn = jnp.transpose(x, (0, *(1 + i for i in c["lhs_spec"])))  # (n, 1, C, spatial...)
    gn = jnp.transpose(g, (0, *(1 + i for i in c["out_spec"])))  # (n, 1, d_out, spatial...)
    xn, gn = jnp.reshape(xn, (n, *xn.shape[2:])), jnp.reshape(gn, (n, *gn.shape[2:]))
    in_channels = d_in // math.prod(c["filter_shape"])
    locations = math.prod(gn.shape[2:])

    def conv(lhs, kernel):  # N C spatial... / O I spatial... / N C spatial..., the site's geometry
        return jax.lax.conv_general_dilated(
            lhs,
            kernel,
            c["window_strides"],
            c["padding"],
            lhs_dilation=c["lhs_dilation"],
            rhs_dilation=c["rhs_dilation"],
            precision=jax.lax.Precision.HIGHEST,
        )

    with_bias = layer.bias is not None and site.bias is not None and site.bias[0] == layer.bias
    g_sum = jnp.sum(jnp.reshape(gn, (n, d_out, locations)), axis=-1)  # (n, d_out): Σ_t g_t, the bias gradient
    if direct_is_cheaper(n_factors, rows, d_out, locations):
        w = jnp.reshape(fm[:, :d_in], (n_factors, in_channels, *c["filter_shape"], d_out))
        kernel = jnp.reshape(jnp.moveaxis(w, -1, 1), (n_factors * d_out, in_channels, *c["filter_shape"]))
        y = jnp.reshape(conv(xn, kernel), (n, n_factors, d_out, locations))
        s = jnp.einsum("nfot,not->fn", y, jnp.reshape(gn, (n, d_out, locations)))
        if with_bias:
            s = s + fm[:, d_in] @ g_sum.T
        return s
    zero = jnp.zeros((d_out, in_channels, *c["filter_shape"]), dtype)

    def kernel_gradient(xi, gi):
        return jax.vjp(lambda k: conv(xi[None], k), zero)[1](gi[None])[0]

    grads = jax.vmap(kernel_gradient)(xn, gn)  # (n, d_out, in_channels, *filter)
    per_example = jnp.reshape(jnp.moveaxis(grads, 1, -1), (n, d_in, d_out))
    s = jnp.reshape(fm[:, :d_in], (n_factors, -1)) @ jnp.reshape(per_example, (n, -1)).T
    if with_bias:
        s = s + fm[:, d_in] @ g_sum.T
    return s


def layer_profile(tracer: Tracer) -> LayerProfile:
    """The sizes the cost model needs: ``(rows, d_out, locations, stored inputs)`` per layer, other entries.

    ``stored inputs``: entries of the recorded layer input per example — the
    input itself for a convolution contracted natively, ``locations × rows``
    otherwise.
    """
    tags = tracer.tags

    def stored(layer):
        if layer.one_hot_inputs:  # the ids
            return layer.locations
        if native_conv(layer):
            return sum(math.prod(site.x_shape) for site in layer.sites)
        return layer.locations * layer.rows

    layers = []
    for layer in tags.layers:  # a layer stacked along a scan: one entry per step
        steps = max(layer.steps, 1)
        layers += [(layer.rows, layer.d_out, layer.locations // steps, stored(layer) // steps)] * steps
    layers = tuple(layers)
    other = {fb.leaf for fb in tags.fallbacks} | set(tracer.diff_leaves)
    return LayerProfile(layers, sum(math.prod(tags.shapes[leaf]) for leaf in other))


__all__ = ["contract_by_layer", "layer_profile", "native_conv"]
