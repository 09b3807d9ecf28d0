"""Pytree arithmetic, raveling and structural validation.

Every other module does tree arithmetic through these helpers, so that the
numerical code reads like linear algebra and the validation messages are the
same everywhere.
"""

from __future__ import annotations

import collections.abc
import math
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


# ----------------------------------------------------------------------------
# Arithmetic
# ----------------------------------------------------------------------------


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.subtract, a, b)


def tree_scale(alpha, a: PyTree) -> PyTree:
    return jax.tree.map(lambda x: alpha * x, a)


def tree_axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y``."""
    return jax.tree.map(lambda xi, yi: alpha * xi + yi, x, y)


def tree_vdot(a: PyTree, b: PyTree):
    """Real inner product ``<a, b>`` summed over all leaves."""
    parts = [jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return sum(parts) if parts else jnp.zeros(())


def tree_norm(a: PyTree):
    return jnp.sqrt(tree_vdot(a, a))


def tree_all_finite(a: PyTree):
    """Whether every entry of every leaf is finite, as one traced boolean (``True`` for an empty tree)."""
    return jnp.all(jnp.stack([jnp.bool_(True), *(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(a))]))


def tree_zeros_like(a: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, a)


def tree_where(cond, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def tree_size(a: PyTree) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(a))


# ----------------------------------------------------------------------------
# Static description of a parameter tree, raveling
# ----------------------------------------------------------------------------


class TreeSpec(NamedTuple):
    """Hashable description of a pytree of arrays (structure, shapes, dtypes).

    Kept in solver states as static metadata so that one compiled solve serves
    every right-hand side with the same structure, and so that a mismatching
    right-hand side is reported while tracing.
    """

    treedef: Any
    shapes: tuple
    dtypes: tuple

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def dtype(self):
        return jnp.result_type(*self.dtypes) if self.dtypes else jnp.float32

    def leaf_paths(self) -> list[str]:
        dummy = jax.tree.unflatten(self.treedef, list(range(len(self.shapes))))
        return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(dummy)[0]]


def is_array_leaf(x) -> bool:
    """True for what can be a leaf of a parameter or data tree: an array, a tracer or a Python/NumPy number."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex)) or (
        hasattr(x, "shape") and hasattr(x, "dtype")
    )


def check_array_leaves(tree: PyTree, name: str) -> None:
    """Raise ``ValueError`` naming the first leaf of ``tree`` that is not an array or a number."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not is_array_leaf(leaf):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} is a {type(leaf).__name__} ({_short_repr(leaf)}), not an array. "
                f"Every leaf of {name} must be an array; keep other values out of the tree (e.g. in a closure, "
                "or with nnx.split(model, nnx.Param) for parameters)."
            )


def _check_trained(params: PyTree, name: str) -> None:
    """Refuse model state that is not trained by gradient but would be differentiated as parameters.

    Flax Linen variables with collections beside ``'params'`` (``batch_stats``: running means and variances), and
    Flax NNX variables that are not ``nnx.Param`` (``nnx.BatchStat``...): their float leaves pass every other
    check, and influence would then include gradients and curvature in the running statistics.
    """
    mapping = isinstance(params, collections.abc.Mapping)
    collections_only = mapping and all(isinstance(v, collections.abc.Mapping) for v in params.values())
    if collections_only and "params" in params and len(params) > 1:  # Linen: every collection is a mapping
        others = sorted(str(k) for k in params if k != "params")
        raise ValueError(
            f"{name} holds the Flax Linen collections {others} beside 'params': their leaves (e.g. BatchNorm's "
            f"running statistics) would be differentiated as trained parameters. Pass {name}['params'] and close "
            f"over the rest in the loss: lambda p, batch: loss(model.apply({{'params': p, {others[0]!r}: ...}}, ...))."
        )
    nnx = sys.modules.get("flax.nnx")  # loaded whenever params hold NNX variables; not imported here
    if nnx is None:
        return
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    state = [(p, v) for p, v in flat if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param)]
    if state:
        where = ", ".join(f"{name}{jax.tree_util.keystr(p)} ({type(v).__name__})" for p, v in state[:3])
        raise ValueError(
            f"{name} holds NNX variables that are not parameters: {where}{' ...' if len(state) > 3 else ''}; they "
            "would be differentiated as trained parameters. Split the parameters alone: "
            "graphdef, params, rest = nnx.split(model, nnx.Param, ...), and merge them back in the loss with "
            "nnx.merge(graphdef, params, rest)."
        )


def _short_repr(x, limit: int = 40) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tree_spec(tree: PyTree, name: str = "params") -> TreeSpec:
    """The :class:`TreeSpec` of ``tree``; ``ValueError`` naming ``name`` and the leaf if a leaf is not an array."""
    check_array_leaves(tree, name)
    leaves, treedef = jax.tree.flatten(tree)
    return TreeSpec(
        treedef,
        tuple(tuple(np.shape(x)) for x in leaves),
        tuple(jnp.result_type(x) for x in leaves),
    )


# Parameter dtypes: float32/float64, and half precision, whose curvature is accumulated and factorised in float32
# (the policy of jaxinf.core.precision).
SUPPORTED_DTYPES = tuple(np.dtype(d) for d in (np.float32, np.float64, jnp.bfloat16, jnp.float16))


def check_params(params: PyTree, name: str = "params") -> None:
    """Refuse parameters the curvature cannot be computed for, naming the leaf and the fix.

    The model runs in the one dtype of the parameters: float32, float64, or
    half precision (bfloat16, float16), whose factorisations and accumulations
    then run in float32 (:mod:`jaxinf.core.precision`). Leaves of mixed
    dtypes are refused (an iterative solver's state has one dtype).

    Raises:
      ValueError: no leaves, or only zero-size ones; a leaf that is not an
        array; a leaf that is not float64/32/16 or bfloat16; leaves of more
        than one dtype.
    """
    check_array_leaves(params, name)
    _check_trained(params, name)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if not flat:
        raise ValueError(f"{name} has no array leaves; pass the pytree of the model's float parameters.")
    by_dtype: dict = {}
    for path, leaf in flat:
        where = f"{name}{jax.tree_util.keystr(path)}"
        dtype = np.dtype(jnp.result_type(leaf))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"{where} has dtype {dtype}; pass only the float parameters (e.g. nnx.split(model, nnx.Param))."
            )
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{where} has dtype {dtype}; jaxinf takes float64, float32, bfloat16 or float16 parameters. Cast "
                f"them, e.g. jax.tree.map(lambda a: a.astype(jnp.float32), {name})."
            )
        by_dtype.setdefault(dtype, []).append(where)
    if sum(math.prod(np.shape(leaf)) for _, leaf in flat) == 0:
        raise ValueError(
            f"{name} has only zero-size leaves ({', '.join(w for ws in by_dtype.values() for w in ws)}): there is "
            "no parameter to take the curvature of. Pass the model's trained parameters."
        )
    if len(by_dtype) > 1:
        detail = "; ".join(f"{dt}: {', '.join(w[:3])}{' ...' if len(w) > 3 else ''}" for dt, w in by_dtype.items())
        wide = max(by_dtype, key=lambda dt: dt.itemsize)
        raise ValueError(
            f"The leaves of {name} mix dtypes ({detail}); jaxinf solves in one dtype. Cast them to one, e.g. "
            f"jax.tree.map(lambda a: a.astype(jnp.{wide}), {name})."
        )


def ravel(tree: PyTree, dtype=None):
    """Concatenate the leaves of ``tree`` into one vector (flatten order)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((0,), dtype or jnp.float32)
    dtype = dtype or jnp.result_type(*leaves)
    return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def ravel_batched(tree: PyTree, dtype=None):
    """Ravel a tree whose leaves share a leading batch axis -> ``(n, size)``."""
    leaves = jax.tree.leaves(tree)
    n = leaves[0].shape[0]
    dtype = dtype or jnp.result_type(*leaves)
    return jnp.concatenate([jnp.reshape(x, (n, -1)).astype(dtype) for x in leaves], axis=1)


def unravel(spec: TreeSpec, flat):
    """Inverse of :func:`ravel` for a tree described by ``spec``."""
    out, start = [], 0
    for shape, dtype in zip(spec.shapes, spec.dtypes):
        size = math.prod(shape)
        out.append(jnp.reshape(flat[start : start + size], shape).astype(dtype))
        start += size
    return jax.tree.unflatten(spec.treedef, out)


def unravel_batched(spec: TreeSpec, flat):
    """Inverse of :func:`ravel_batched`: ``(n, size)`` -> tree with leading ``n``."""
    n = flat.shape[0]
    out, start = [], 0
    for shape, dtype in zip(spec.shapes, spec.dtypes):
        size = math.prod(shape)
        out.append(jnp.reshape(flat[:, start : start + size], (n, *shape)).astype(dtype))
        start += size
    return jax.tree.unflatten(spec.treedef, out)


# ----------------------------------------------------------------------------
# Validation (raised while tracing, from static shapes)
# ----------------------------------------------------------------------------


def check_matches(tree: PyTree, spec: TreeSpec, name: str, *, leading: int = 0) -> None:
    """Raise ``ValueError`` unless ``tree`` has the structure and shapes of ``spec``.

    Args:
      tree: the tree to check (e.g. a right-hand side ``v``).
      spec: the expected layout (usually of the parameters).
      name: how to call ``tree`` in the message.
      leading: number of extra leading (batch) axes each leaf may carry.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if treedef != spec.treedef:
        raise ValueError(
            f"{name} must have the tree structure of the parameters.\n"
            f"  expected: {spec.treedef}\n  got:      {treedef}\n"
            "Pass a pytree built like the params (e.g. from jax.grad of the loss)."
        )
    paths = spec.leaf_paths()
    for path, leaf, shape in zip(paths, leaves, spec.shapes):
        got = tuple(np.shape(leaf))
        if got[leading:] != tuple(shape) or len(got) != len(shape) + leading:
            extra = f" plus {leading} leading batch axis" if leading else ""
            raise ValueError(f"{name}{path} has shape {got}, but the parameter has shape {tuple(shape)}{extra}.")
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise ValueError(f"{name}{path} has dtype {jnp.result_type(leaf)}; a float dtype is needed.")
    if leading:
        sizes = {tuple(np.shape(x)[:leading]) for x in leaves}
        if len(sizes) > 1:
            raise ValueError(f"{name}: the leaves disagree on the leading axes: {sorted(sizes)}.")


def as_factors(factors: PyTree, spec: TreeSpec, like: PyTree, name: str = "factors") -> PyTree:
    """``factors`` (a leading axis of test points) checked and cast for scoring against the params ``like``.

    The layout of ``spec`` (:func:`check_matches`, one leading axis), real float leaves, finite values (one
    compiled check on the device; the leaf and row are looked up on the host only when it fails; skipped for
    tracers and arrays over several processes, as :func:`check_finite`), then each leaf cast to the dtype of its
    leaf of ``like`` (e.g. float32 factors of a float64 model).
    """
    check_matches(factors, spec, name, leading=1)
    leaves = jax.tree.leaves(factors)
    for path, leaf in zip(spec.leaf_paths(), leaves):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(f"{name}{path} has dtype {jnp.result_type(leaf)}; real float factors are needed.")
    if not any(is_tracer(x) or not getattr(x, "is_fully_addressable", True) for x in leaves):
        if not bool(_all_finite(factors)):
            check_finite(factors, name, per_example=True, advice="recompute the factors (a failed solve?).")
    return cast_like(factors, tree_spec(like))


_all_finite = jax.jit(tree_all_finite)


def owned_params(params: PyTree, name: str = "params") -> PyTree:
    """``params`` checked (:func:`check_params`, :func:`check_finite`), with every writeable NumPy leaf copied.

    A fitted state keeps the params it was fitted at; a NumPy array of the user's is mutable, and changing it in
    place afterwards (``w -= lr * g``) would change later solves (CG's products) without a refit. The copies are
    read-only, so writing into ``model.params`` raises instead.
    """
    check_params(params, name)
    check_finite(params, name)
    if not any(isinstance(a, np.ndarray) and a.flags.writeable for a in jax.tree.leaves(params)):
        return params  # the same object: jax.Arrays are immutable
    return jax.tree.map(lambda a: readonly_copy(a) if isinstance(a, np.ndarray) and a.flags.writeable else a, params)


def readonly_copy(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` that cannot be written to."""
    out = np.array(a, copy=True)
    out.flags.writeable = False
    return out


def cast_like(tree: PyTree, spec: TreeSpec) -> PyTree:
    """``tree`` (laid out as ``spec``, checked by :func:`check_matches`) with each leaf in its parameter's dtype.

    A right-hand side of another float dtype (float32 gradients of a float64 model) would otherwise fail inside
    ``jax.jvp``, whose tangents must have the primal's dtype; leaves already in it are returned as they are.
    """
    leaves, treedef = jax.tree.flatten(tree)
    cast = [x if jnp.result_type(x) == d else jnp.asarray(x, d) for x, d in zip(leaves, spec.dtypes)]
    return jax.tree.unflatten(treedef, cast)


def is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_finite(tree: PyTree, name: str, *, per_example: bool = False, advice: str | None = None) -> None:
    """Raise ``ValueError`` naming the first leaf of ``tree`` holding NaN or inf.

    Host-side check for concrete inputs: tracers (no values yet) and arrays
    spread over several processes (not readable here) are skipped.

    Args:
      tree: the pytree to check.
      name: how to call ``tree`` in the message.
      per_example: the leaves share a leading example axis; the message then
        also names the first example (row) holding a non-finite value, e.g.
        for per-example gradients of test points.
      advice: what to do, replacing the default advice about the inputs.
    """
    advice = advice or "influence computations need finite inputs. Clean the data or check the training run."
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if is_tracer(leaf) or not getattr(leaf, "is_fully_addressable", True):
            continue
        arr = np.asarray(leaf)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            finite = np.isfinite(arr)
            bad = int(np.size(arr) - np.count_nonzero(finite))
            where = ""
            if per_example and arr.ndim >= 1:
                rows = np.flatnonzero(~np.all(finite.reshape(arr.shape[0], -1), axis=1))
                where = f" (example {int(rows[0])} first; {rows.size} example(s) in all)"
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} contains {bad} NaN or inf value(s){where}; {advice}")


@jax.jit
def rowwise_dot(a: PyTree, b: PyTree) -> jax.Array:
    """``out[i] = Σ_leaves ⟨a[i], b[i]⟩``: the dot product of row ``i`` of two trees with a common leading axis."""
    return sum(
        jnp.sum(jnp.reshape(x * y, (x.shape[0], -1)), axis=1) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def placed_like(new, old):
    """``new`` with the sharding of ``old`` when that spans several devices (a fit on a mesh refits on it).

    On one device ``new`` is left as it is: committing it would change the
    jit cache key of every step it enters (a recompile for the same program).
    """
    if isinstance(old, jax.Array) and len(old.sharding.device_set) > 1:
        return jax.device_put(new, old.sharding)
    return new
