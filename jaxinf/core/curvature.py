"""Curvature operators ``v -> (C + λI) v`` over parameter pytrees.

``C`` is the curvature of the **mean** training loss
``L(θ) = (1/n) Σ_i ℓ(θ, z_i)`` at the trained parameters, in one of three
flavours:

* ``"hessian"``: ``H = ∇²L(θ)``, applied forward-over-reverse
  (Pearlmutter 1994): ``Hv = ∂/∂ε ∇L(θ + εv)``.
* ``"gauss_newton"``: the generalized Gauss-Newton ``G = Jᵀ H_out J``
  (Schraudolph 2002), for a loss written as ``output_loss(model_fn(θ, z), z)``;
  ``J`` is the Jacobian of the model outputs and ``H_out`` the Hessian of the
  output loss with respect to the outputs. PSD whenever the output loss is
  convex (squared error, cross-entropy on logits).
* ``"fisher"``: the empirical Fisher ``F = (1/n) Σ_i g_i g_iᵀ`` with
  ``g_i = ∇ℓ(θ, z_i)``, applied without forming any ``g_i``:
  ``u = J_ℓ v`` (one JVP of the per-example losses) then ``J_ℓᵀ u / n``.

The operator is a pytree (:class:`CurvatureOperator`): parameters, data and
damping are its children, the functions and the block layout are static, so
it passes through ``jit`` and ``vmap`` and one compiled solve serves every
dataset of the same shapes. The dataset is averaged **weighted by batch size**
(see :func:`jaxinf.core.data.weighted_mean`).

Block-diagonal curvature (``blocks="layer"``, ``"parameter"`` or user
labels) keeps only the diagonal blocks ``C_bb`` and allows one damping value
per block.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.blocks import resolve_blocks, resolve_damping
from jaxinf.core.data import Batches, add_example_axis, as_batches, select, weighted_mean
from jaxinf.core.precision import compute_dtype_of, promote
from jaxinf.core.tree import TreeSpec, check_finite, check_matches, check_params, is_tracer, tree_spec

PyTree = Any
CURVATURES = ("hessian", "gauss_newton", "fisher")


# ----------------------------------------------------------------------------
# Per-batch products (each is the product with the *mean* curvature of the batch)
# ----------------------------------------------------------------------------


def per_example_losses(loss_fn: Callable, params: PyTree, batch: PyTree):
    """``[ℓ(θ, z_1), ..., ℓ(θ, z_b)]``: ``loss_fn`` on batches of one, vmapped."""
    return jax.vmap(lambda example: loss_fn(params, add_example_axis(example)))(batch)


def per_example_grads(loss_fn: Callable, params: PyTree, batch: PyTree) -> PyTree:
    """``∇θℓ(θ, z_j)`` for each example ``j`` of ``batch``: params-shaped leaves with a leading ``n``."""
    return jax.vmap(lambda example: jax.grad(loss_fn)(params, add_example_axis(example)))(batch)


def hessian_vp(loss_fn: Callable, params: PyTree, batch: PyTree, v: PyTree) -> PyTree:
    """``∇²_θ loss_fn(θ, batch) · v``, forward-over-reverse."""
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (params,), (v,))[1]


def gauss_newton_vp(model_fn: Callable, output_loss: Callable, params: PyTree, batch: PyTree, v: PyTree) -> PyTree:
    """``Jᵀ H_out J v`` for ``loss = output_loss(model_fn(θ, batch), batch)``."""
    outputs, vjp_fn = jax.vjp(lambda p: model_fn(p, batch), params)
    _, jv = jax.jvp(lambda p: model_fn(p, batch), (params,), (v,))
    h_jv = jax.jvp(lambda o: jax.grad(output_loss)(o, batch), (outputs,), (jv,))[1]
    return vjp_fn(h_jv)[0]


def fisher_vp(loss_fn: Callable, params: PyTree, batch: PyTree, v: PyTree) -> PyTree:
    """``(1/b) Σ_i g_i (g_iᵀ v)`` over the batch, with no per-example gradient formed."""
    losses, vjp_fn = jax.vjp(lambda p: per_example_losses(loss_fn, p, batch), params)
    _, gv = jax.jvp(lambda p: per_example_losses(loss_fn, p, batch), (params,), (v,))
    return vjp_fn(gv / losses.shape[0])[0]


# ----------------------------------------------------------------------------
# Checking the loss on the training data
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitLoss:
    """``output_loss(model_fn(params, batch), batch)``, hashable by its two functions (one compile per pair)."""

    model_fn: Callable
    output_loss: Callable

    def __call__(self, params, batch):
        return self.output_loss(self.model_fn(params, batch), batch)


def check_kind(kind: str, loss_fn: Callable | None, model_fn: Callable | None, output_loss: Callable | None) -> None:
    """``ValueError`` for an unknown curvature ``kind`` or one whose functions are missing."""
    if kind not in CURVATURES:
        raise ValueError(f"Unknown curvature {kind!r}; choose one of {CURVATURES}.")
    if kind == "gauss_newton" and (model_fn is None or output_loss is None):
        raise ValueError(
            "curvature='gauss_newton' needs model_fn(params, batch) -> outputs and "
            "output_loss(outputs, batch) -> mean loss."
        )
    if kind != "gauss_newton" and loss_fn is None:
        raise ValueError(f"curvature={kind!r} needs loss_fn(params, batch) -> mean loss.")


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


def check_loss(loss_fn: Callable, params: PyTree, data: Batches) -> None:
    """Raise ``ValueError`` unless ``loss_fn`` gives a finite scalar on every batch of ``data``.

    An error of ``loss_fn`` itself on the first batch (params of another
    model, batches of another shape, a function JAX cannot trace) is
    re-raised as a ``ValueError`` that names the function and both causes to
    look for, with the original error as its cause. The shape is
    checked from shapes alone (``jax.eval_shape``); the values with one
    forward pass per batch, on the host, when params and data are
    concrete arrays on this process (skipped under ``jit`` and for data
    spread over several processes). A non-finite batch is named with its
    first non-finite example.
    """
    src, i = data.source(0)  # the first batch, from shapes (indexing a stack would compile a program)
    try:
        out = jax.eval_shape(lambda p, s: loss_fn(p, select(s, i)), _abstract(params), _abstract(src))
    except Exception as err:  # any error of the user's function (Flax's are plain Exceptions): re-raised, cause kept
        name = "model_fn/output_loss" if isinstance(loss_fn, SplitLoss) else "loss_fn"
        mutates = "TraceContext" in type(err).__name__  # Flax: state (an RNG count, batch statistics) set in a trace
        raise ValueError(
            f"{name}(params, batch) fails on the first batch of the training data, traced by JAX: "
            f"{type(err).__name__}: {err}. "
            + (
                "The model changes its own state when called (dropout's RNG count, batch statistics): put it in "
                "evaluation mode before splitting it (NNX: model.eval(); Linen: deterministic=True, "
                "use_running_average=True), since influence is taken at fixed parameters. "
                if mutates
                else ""
            )
            + "If params or the batches are not what the model takes, pass the params it was trained with (the same "
            "tree structure, shapes and dtypes) and batches of its input shapes; otherwise the function must be "
            "traceable (no NumPy conversion of, or Python branching on, the values of params or batch)."
        ) from err
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = out.shape if isinstance(out, jax.ShapeDtypeStruct) else jax.tree.map(lambda o: o.shape, out)
        raise ValueError(
            f"loss_fn(params, batch) must return a scalar, the mean loss over the batch, but returns {shape}. "
            "Reduce it with jnp.mean over the examples."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"loss_fn(params, batch) must return a real float scalar, but returns dtype {out.dtype}: influence "
            "needs a real loss to differentiate (take the real part or the squared modulus of a complex value)."
        )
    leaves = jax.tree.leaves((params, data))
    if any(is_tracer(x) or not getattr(x, "is_fully_addressable", True) for x in leaves):
        return
    stacked, rest = _all_losses(loss_fn, params, data.stacked, data.rest)
    values = [*([] if stacked is None else np.asarray(stacked).tolist()), *(float(v) for v in rest)]
    bad_batches = [i for i, v in enumerate(values) if not np.isfinite(v)]
    if not bad_batches:
        return
    i = bad_batches[0]
    batch = next(itertools.islice(data.batches(), i, None))
    losses = np.asarray(_example_losses(loss_fn, params, batch))
    bad = np.flatnonzero(~np.isfinite(losses))
    where = f", first at example {int(bad[0])} of {losses.size}" if bad.size else ""
    label = f"data[batch {i}]" if len(values) > 1 else "data"
    raise ValueError(
        f"loss_fn(params, batch) is {values[i]} on {label}{where} ({len(bad_batches)} of {len(values)} batch(es) "
        "non-finite), though data and params are finite. Check the loss for log(0), division by zero or labels "
        "out of range."
    )


@functools.partial(jax.jit, static_argnums=0)
def _all_losses(loss_fn, params, stacked, rest):
    """The loss on every batch: the stacked ones (``lax.map``) and the others, in one compiled program."""
    values = None if stacked is None else jax.lax.map(lambda batch: loss_fn(params, batch), stacked)
    return values, tuple(loss_fn(params, b) for b in rest)


@functools.partial(jax.jit, static_argnums=0)
def _example_losses(loss_fn, params, batch):
    return per_example_losses(loss_fn, params, batch)


# ----------------------------------------------------------------------------
# The operator
# ----------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class CurvatureOperator:
    """``v -> (C + Λ) v`` with ``C`` the (block-diagonal) curvature of the mean loss.

    ``Λ`` is diagonal with one damping value per block. Build it with
    :func:`curvature_operator`. Children: ``params``, ``data``, ``damping``;
    static: the functions, the kind and the block layout.
    """

    params: PyTree
    data: Batches
    damping: tuple
    kind: str
    loss_fn: Callable | None
    model_fn: Callable | None
    output_loss: Callable | None
    block_ids: tuple[int, ...]
    block_names: tuple[str, ...]
    spec: TreeSpec

    def tree_flatten(self):
        aux = (self.kind, self.loss_fn, self.model_fn, self.output_loss, self.block_ids, self.block_names, self.spec)
        return (self.params, self.data, self.damping), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    # -- sizes -------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of scalar parameters ``p``."""
        return self.spec.size

    @property
    def dtype(self):
        """The accumulate dtype: of every vector in and out (float32 for half-precision parameters)."""
        return self.spec.dtype

    @property
    def compute_dtype(self):
        """The dtype the model runs in (:mod:`jaxinf.core.precision`): bfloat16 for bfloat16 parameters."""
        return compute_dtype_of(self.model_fn if self.loss_fn is None else self.loss_fn, self.spec.dtype)

    @property
    def num_examples(self) -> int:
        return self.data.num_examples

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def block_leaf_indices(self, block: int) -> list[int]:
        return [i for i, b in enumerate(self.block_ids) if b == block]

    def block_flat_indices(self, block: int) -> np.ndarray:
        """Positions of a block's entries in the raveled parameter vector."""
        starts = np.cumsum([0] + [math.prod(s) for s in self.spec.shapes])
        return np.concatenate(
            [np.arange(starts[i], starts[i + 1]) for i in self.block_leaf_indices(block)] or [np.zeros(0, int)]
        )

    # -- products ----------------------------------------------------------
    def batch_curvature_vp(self, batch: PyTree, v: PyTree) -> PyTree:
        """Undamped, full (not block-restricted) product with the mean curvature of one batch."""
        if self.kind == "hessian":
            return hessian_vp(self.loss_fn, self.params, batch, v)
        if self.kind == "gauss_newton":
            return gauss_newton_vp(self.model_fn, self.output_loss, self.params, batch, v)
        return fisher_vp(self.loss_fn, self.params, batch, v)

    def curvature_vp(self, v: PyTree) -> PyTree:
        """``C v`` over the whole dataset: undamped, full (no block restriction)."""
        return weighted_mean(lambda batch: self.batch_curvature_vp(batch, v), self.data)

    def damping_vp(self, v: PyTree) -> PyTree:
        """``Λ v``."""
        leaves, treedef = jax.tree.flatten(v)
        return jax.tree.unflatten(treedef, [d.astype(x.dtype) * x for d, x in zip(self.damping, leaves)])

    def _blockwise(self, product: Callable[[PyTree], PyTree], v: PyTree) -> PyTree:
        """``product`` restricted to the diagonal blocks: block ``k`` of the result is ``product(v_k)_k``."""
        if self.num_blocks == 1:
            return product(v)
        leaves, treedef = jax.tree.flatten(v)
        masked = [
            jax.tree.unflatten(treedef, [x if b == k else jnp.zeros_like(x) for x, b in zip(leaves, self.block_ids)])
            for k in range(self.num_blocks)
        ]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *masked)
        products = jax.tree.leaves(jax.vmap(product)(stacked))
        return jax.tree.unflatten(treedef, [p[b] for p, b in zip(products, self.block_ids)])

    def block_curvature_vp(self, v: PyTree) -> PyTree:
        """``C_blockdiag v`` over the whole dataset, undamped (not ``matvec(v) − Λ v``, which cancels to 0 where
        ``Λ`` dwarfs ``C``)."""
        return self._blockwise(self.curvature_vp, v)

    def batch_block_curvature_vp(self, batch: PyTree, v: PyTree) -> PyTree:
        """``C_batch,blockdiag v`` with the mean curvature of one ``batch``, undamped."""
        return self._blockwise(lambda u: self.batch_curvature_vp(batch, u), v)

    def matvec(self, v: PyTree) -> PyTree:
        """``(C_blockdiag + Λ) v``; ``v`` must have the structure and shapes of the params."""
        check_matches(v, self.spec, "v")
        return jax.tree.map(jnp.add, self.block_curvature_vp(v), self.damping_vp(v))

    def batch_matvec(self, batch: PyTree, v: PyTree) -> PyTree:
        """``(C_batch,blockdiag + Λ) v`` with the mean curvature of one ``batch`` (e.g. a minibatch)."""
        check_matches(v, self.spec, "v")
        return jax.tree.map(jnp.add, self.batch_block_curvature_vp(batch, v), self.damping_vp(v))

    __call__ = matvec

    def with_damping(self, damping: Any) -> CurvatureOperator:
        """The same operator with new damping (scalar or ``{block: λ}``)."""
        return dataclasses.replace(self, damping=resolve_damping(damping, self.block_ids, self.block_names))


def curvature_operator(
    loss_fn: Callable | None,
    params: PyTree,
    data: Any,
    *,
    kind: str = "hessian",
    damping: Any = 0.0,
    blocks: Any = None,
    model_fn: Callable | None = None,
    output_loss: Callable | None = None,
) -> CurvatureOperator:
    """Build the damped curvature operator of the mean loss over ``data``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the
        leading axis of ``batch``. Needed for ``"hessian"`` and ``"fisher"``.
      params: the parameters at which the curvature is taken.
      data: one batch, or a list/iterable of batches of any sizes.
      kind: ``"hessian"``, ``"gauss_newton"`` or ``"fisher"``.
      damping: ``λ >= 0``, a scalar or a mapping ``{block name: λ}``.
      blocks: block structure, see :func:`resolve_blocks`.
      model_fn: ``model_fn(params, batch) -> outputs`` (``"gauss_newton"``).
      output_loss: ``output_loss(outputs, batch) -> scalar`` mean loss
        (``"gauss_newton"``).

    Returns:
      A :class:`CurvatureOperator`; ``op.matvec(v)`` gives ``(C + λ) v``.
      For bfloat16/float16 ``params`` the operator holds a float32 master
      copy and the functions wrapped to run the model in the parameters'
      dtype (:func:`jaxinf.core.precision.promote`): ``op.dtype`` is float32,
      and so is every vector a solver sees.

    Raises:
      ValueError: unknown ``kind``, missing functions, bad damping (also one
        that is not a real number) or blocks, malformed, empty or non-finite
        data, params that are not all of one float dtype
        (:func:`jaxinf.core.tree.check_params`), a loss that is not a scalar
        or is not finite on a training batch.
    """
    check_kind(kind, loss_fn, model_fn, output_loss)
    check_params(params)
    check_finite(params, "params")
    block_ids, block_names = resolve_blocks(params, blocks)
    params, loss_fn, model_fn = promote(params, loss_fn, model_fn)
    batches = as_batches(data, name="data")
    loss = loss_fn if kind != "gauss_newton" else SplitLoss(model_fn, output_loss)
    check_loss(loss, params, batches)
    return CurvatureOperator(
        params=params,
        data=batches,
        damping=resolve_damping(damping, block_ids, block_names),
        kind=kind,
        loss_fn=loss_fn,
        model_fn=model_fn,
        output_loss=output_loss,
        block_ids=block_ids,
        block_names=block_names,
        spec=tree_spec(params),
    )


def to_dense(operator: CurvatureOperator, *, column_batch: int = 128):
    """The dense matrix ``C_blockdiag + Λ`` on the raveled parameters (``p × p``).

    For tests and inspection of small models: it costs ``p`` products.
    """
    from jaxinf.core.tree import ravel, unravel

    spec = operator.spec
    p = spec.size

    def column(j):
        return ravel(operator.matvec(unravel(spec, jax.nn.one_hot(j, p, dtype=spec.dtype))), spec.dtype)

    return jax.lax.map(column, jnp.arange(p), batch_size=max(1, min(column_batch, p))).T
