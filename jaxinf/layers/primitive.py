"""The explicit-tag primitive: :func:`tag_dense` and the rules that make it an identity under every transformation.

The tag is what the matching step (:mod:`jaxinf.layers.match`) reads first:
an explicit tag takes precedence over automatic matching.
"""

from __future__ import annotations

import jax.extend as jex
import jax.numpy as jnp
from jax.interpreters import ad, batching, mlir

dense_tag_p = jex.core.Primitive("jaxinf_dense_tag")


def tag_dense(y, x, w, b=None, *, transposed: bool = False):
    """Mark ``y = x @ w (+ b)`` as a dense layer for K-FAC; returns ``y`` unchanged.

    Use it for custom layers that automatic tagging cannot see (a custom
    kernel, a ``custom_vjp`` product, a weight that goes through a
    non-layout operation). The tag is an identity on ``y`` for every JAX
    transformation; it only tells :func:`find_layers` that ``w`` (and ``b``)
    form one dense layer. All other uses of ``w`` and ``b`` are then taken to
    be part of that layer's computation.

    Args:
      y: the layer output, shape ``(..., d_out)``.
      x: the layer input, shape ``(..., d_in)`` (the same leading axes).
      w: the weight, a parameter leaf of shape ``(d_in, d_out)``, or
        ``(d_out, d_in)`` with ``transposed=True``.
      b: optional bias leaf of shape ``(d_out,)``.
      transposed: whether ``w`` is stored output-major (``y = x @ w.T``).

    Returns:
      ``y``.

    Examples:
      >>> import jax.numpy as jnp, jaxinf
      >>> x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
      >>> jaxinf.tag_dense(x @ w, x, w).shape
      (2, 4)
    """
    y, x, w = jnp.asarray(y), jnp.asarray(x), jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"tag_dense: w must be a 2-D weight, got shape {w.shape}.")
    d_in, d_out = (w.shape[1], w.shape[0]) if transposed else w.shape
    if x.shape[-1:] != (d_in,) or y.shape[-1:] != (d_out,) or x.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            f"tag_dense: shapes do not form a dense layer: y {y.shape}, x {x.shape}, w {w.shape}"
            f"{' (transposed)' if transposed else ''}; expected x (..., {d_in}) and y (..., {d_out})."
        )
    args = [y, x, w]
    if b is not None:
        b = jnp.asarray(b)
        if b.shape != (d_out,):
            raise ValueError(f"tag_dense: b must have shape ({d_out},), got {b.shape}.")
        args.append(b)
    return dense_tag_p.bind(*args, transposed=bool(transposed), has_bias=b is not None)


def _tag_abstract(y, *rest, **params):
    del rest, params
    return y


def _tag_jvp(primals, tangents, **params):
    out = dense_tag_p.bind(*primals, **params)
    return out, ad.instantiate_zeros(tangents[0])


def _tag_batch(args, dims, **params):
    y, x, w, *b = args
    if dims[2] is not None or (b and dims[3] is not None) or dims[0] is None:
        return y, dims[0]  # per-example weights: the tag no longer describes a dense layer
    y = jnp.moveaxis(y, dims[0], 0)
    x = jnp.broadcast_to(x, (y.shape[0], *x.shape)) if dims[1] is None else jnp.moveaxis(x, dims[1], 0)
    return dense_tag_p.bind(y, x, w, *b, **params), 0


dense_tag_p.def_impl(lambda y, *rest, **params: y)
dense_tag_p.def_abstract_eval(_tag_abstract)
ad.primitive_jvps[dense_tag_p] = _tag_jvp
batching.primitive_batchers[dense_tag_p] = _tag_batch
mlir.register_lowering(dense_tag_p, mlir.lower_fun(lambda y, *rest, **params: y, multiple_results=False))
