"""Mixed precision: the model computes in its parameters' dtype, the linear algebra in float32 or float64.

The policy, in one place:

* **compute dtype** (:func:`compute_dtype`): the dtype of the parameters. The
  model's forward and backward passes — per-example gradients, Hessian,
  Gauss-Newton and Fisher-vector products, JVPs of the losses — run in it,
  bfloat16 and float16 included.
* **accumulate dtype** (:func:`accumulate_dtype`): float32 for half-precision
  parameters (float16, bfloat16), else the parameters' own dtype; float64 on
  request (``accumulate=jnp.float64``, 64-bit JAX only). Every vector a
  solver sees is in it: gradients leave the model cast up, curvature-vector
  products are averaged over batches in it, dense curvature matrices,
  Cholesky and eigendecompositions, Krylov bases, CG/LiSSA iterates, sketches
  and the influence sums ``fᵀg`` are formed in it, and influences come back in
  it (float32 for bfloat16 parameters).

How: :func:`promote` keeps a float32 *master copy* of the parameters and wraps
the loss (and ``model_fn``) in :class:`InCompute`, which casts the master
copy down to the compute dtype before the model runs and casts the result up
after it. Differentiating the wrapped loss with respect to the master copy
therefore runs the model's backward pass in bfloat16 while the gradient
arrives in float32 (the transpose of the down-cast is an up-cast); a float32
tangent is cast down before the model's JVP. Nothing else in the library
needs to know: every solver works on the operator's dtype, which is the
accumulate dtype. (Micikevicius et al. 2018, *Mixed Precision Training*,
keep float32 master weights and accumulations for the same reason: bfloat16
has 8 significant bits, about 2–3 decimal digits.)

Half-precision parameters give influences to about two significant digits
(the gradients themselves carry bfloat16 rounding); rankings are what
survive. ``tests/test_mixed_precision.py`` measures each solver against the
same model in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

#: Parameter dtypes that are computed in but never factorised or accumulated in.
HALF_DTYPES = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))
#: Dtypes a factorisation, an eigendecomposition or an accumulation may run in (LAPACK has no half precision).
ACCUMULATE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

__all__ = [
    "ACCUMULATE_DTYPES",
    "HALF_DTYPES",
    "InCompute",
    "accumulate_dtype",
    "check_accumulate_dtype",
    "compute_dtype",
    "compute_dtype_of",
    "in_compute",
    "is_half",
    "refuse_half",
    "promote",
]


def is_half(dtype) -> bool:
    """True for float16 and bfloat16."""
    return np.dtype(dtype) in HALF_DTYPES


def refuse_half(params: PyTree, where: str) -> None:
    """``ValueError`` for bfloat16/float16 ``params`` on a path that does not run them through this policy yet."""
    if is_half(compute_dtype(params)):
        raise ValueError(
            f"{where} does not take {compute_dtype(params)} params yet (only InfluenceModel's fit, influences, "
            "influence_factors and self_influence do). Cast them for this call: "
            "jax.tree.map(lambda a: a.astype(jnp.float32), params)."
        )


def compute_dtype(params: PyTree):
    """The dtype the model runs in: the (promoted) dtype of the leaves of ``params``."""
    leaves = jax.tree.leaves(params)
    return np.dtype(jnp.result_type(*leaves)) if leaves else np.dtype(np.float32)


def check_accumulate_dtype(dtype, name: str = "accumulate") -> np.dtype:
    """``dtype`` as a NumPy dtype if a factorisation or an accumulation may run in it, else ``ValueError``.

    float32 and float64 (64-bit JAX only) qualify; half precision does not:
    LAPACK has no half-precision Cholesky or eigensolver, and 8 significant
    bits cannot resolve a curvature's spectrum.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"{name} must be a float dtype (jnp.float32 or jnp.float64), got {dtype!r}.") from err
    if dt not in ACCUMULATE_DTYPES:
        raise ValueError(
            f"{name}={dt} is too narrow for factorisations and accumulations: they run in float32 or float64 "
            f"(LAPACK has no {dt} eigensolver or Cholesky). Use jnp.float32 (or jnp.float64 with 64-bit JAX); "
            "the model itself still computes in its parameters' dtype."
        )
    if dt == np.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            f"{name}=float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) first, or use float32."
        )
    return dt


def accumulate_dtype(params: PyTree, requested=None) -> np.dtype:
    """The dtype solvers work in for ``params``: ``requested``, else float32 for half precision, else their dtype.

    Raises:
      ValueError: a ``requested`` dtype below float32, float64 without 64-bit
        JAX, or one narrower than the parameters (float32 for float64 ones).
    """
    compute = compute_dtype(params)
    if requested is None:
        return np.dtype(np.float32) if is_half(compute) else compute
    dt = check_accumulate_dtype(requested)
    if not is_half(compute) and dt.itemsize < compute.itemsize:
        raise ValueError(
            f"accumulate={dt} is narrower than the {compute} parameters; accumulate in {compute} (the default)."
        )
    return dt


def _cast_floats(tree: PyTree, dtypes: tuple) -> PyTree:
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [jnp.asarray(x).astype(d) for x, d in zip(leaves, dtypes)])


def _cast_out(out: PyTree, dtype) -> PyTree:
    def up(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(up, out)


@dataclasses.dataclass(frozen=True)
class InCompute:
    """``fn(params, batch)`` evaluated with ``params`` cast to ``dtypes`` (one per leaf), float outputs cast to ``out``.

    Hashable (and equal) by ``(fn, dtypes, out)``: two models of the same loss,
    parameter dtypes and accumulate dtype share their compiled programs.
    """

    fn: Callable
    dtypes: tuple
    out: Any

    def __call__(self, params, batch):
        return _cast_out(self.fn(_cast_floats(params, self.dtypes), batch), self.out)


def promote(params: PyTree, *fns: Callable | None, accumulate=None):
    """The master copy of ``params`` and ``fns`` wrapped to run in the parameters' dtype (see the module).

    For float32/float64 parameters (and no wider ``accumulate``) nothing
    changes: ``params`` and ``fns`` are returned as they are.

    Returns:
      ``(params_in_accumulate_dtype, *wrapped_fns)``; a ``None`` function
      stays ``None``.
    """
    acc = accumulate_dtype(params, accumulate)
    if all(d == acc for d in _dtypes(params)):
        return (params, *fns)
    master = jax.tree.map(lambda x: jnp.asarray(x).astype(acc), params)
    return (master, *(in_compute(params, f, accumulate=accumulate) for f in fns))


def in_compute(params: PyTree, fn: Callable | None, *, accumulate=None) -> Callable | None:
    """``fn`` wrapped as :func:`promote` wraps it for ``params`` (``fn`` itself when nothing is cast)."""
    acc = accumulate_dtype(params, accumulate)
    dtypes = _dtypes(params)
    if fn is None or all(d == acc for d in dtypes):
        return fn
    return InCompute(fn.fn if isinstance(fn, InCompute) else fn, dtypes, acc)


def compute_dtype_of(fn: Callable | None, default):
    """The compute dtype of a function :func:`promote` wrapped (``default`` for any other function)."""
    return np.dtype(jnp.result_type(*fn.dtypes)) if isinstance(fn, InCompute) else np.dtype(default)


def _dtypes(params: PyTree) -> tuple:
    return tuple(np.dtype(jnp.result_type(x)) for x in jax.tree.leaves(params))
