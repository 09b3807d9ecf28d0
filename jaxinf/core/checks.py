"""Checks of a configuration and of a loss and its curvature, run once when a model is fitted.

Influence functions assume things the numbers alone do not reveal: the loss
is the **mean** of per-example losses over the leading axis of every leaf of
a batch, and its curvature is neither zero nor NaN. A loss that sums (answers
off by the batch size), data whose leading axis is time rather than examples
(a wrongly shaped influence matrix) or a Gauss-Newton split whose output loss
is linear in the outputs (a curvature of exactly zero, so every solver
returns plain gradient dot products) would otherwise be computed through
without a word. Each check here costs a few evaluations of the loss and two
curvature-vector products on at most :data:`CHECK_EXAMPLES` examples, and
raises ``ValueError`` naming the argument and the fix. They are compiled
(``jax.jit``): run eagerly, op by op, the two curvature-vector products of
a small Flax CNN took 52 s against 9.5 s to compile and run (notebook 03's
model on a loaded two-core machine).

* :func:`check_damping`, :func:`check_key`: arguments, before anything runs.
* :func:`check_loss`: a scalar, finite mean over the examples (catches sums
  and time-major data).
* :func:`check_curvature`: curvature-vector products that are finite and not
  all zero.
* :func:`check_like_training`: a batch with the training batches' structure
  and per-example shapes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.curvature import CurvatureOperator, SplitLoss, per_example_losses, resolve_damping
from jaxinf.core.damping import is_auto
from jaxinf.core.data import batch_size, select, take
from jaxinf.core.tree import tree_all_finite, tree_norm

PyTree = Any

#: Examples of the first training batch (with at least two) on which the loss and curvature checks run.
CHECK_EXAMPLES = 16

#: XLA options of the check programs that run once on :data:`CHECK_EXAMPLES` examples (the loss values and the
#: curvature probes, one program in check_fit): unoptimised code compiles about 4x faster, and runs as fast here.
CHECK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

__all__ = [
    "CHECK_EXAMPLES",
    "check_curvature",
    "check_damping",
    "check_fit",
    "check_key",
    "check_like_training",
    "check_loss",
    "function_name",
]


def function_name(fn: Callable | None) -> str:
    """A readable name of a function for messages (``module.qualname``, or its ``repr``)."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if name is not None else repr(fn)


# ----------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------


def check_damping(damping: Any, block_names: tuple[str, ...]) -> tuple:
    """Validate ``damping`` against the blocks (before anything is assigned); return one scalar per block.

    Args:
      damping: a real ``λ >= 0``, a mapping ``{block name: λ}`` naming every
        block of ``block_names`` exactly, or ``"auto"`` (:mod:`jaxinf.core.damping`;
        then nothing is returned).
      block_names: the names of the curvature blocks (see
        :func:`jaxinf.core.blocks.resolve_blocks`).

    Raises:
      ValueError: not a real number (a string, ``None``, a bool, a complex or
        an array with axes), NaN, inf or negative, or a mapping with unknown
        or missing blocks; the message names the block.
    """
    if is_auto(damping):
        return ()
    return resolve_damping(damping, tuple(range(len(block_names))), block_names)


def check_key(key: Any, *, name: str = "key") -> None:
    """Raise ``ValueError`` unless ``key`` is ``None`` or one PRNG key.

    Accepted: a typed key (``jax.random.key(0)``, shape ``()``) or a raw
    ``uint32`` key (``jax.random.PRNGKey(0)``, shape ``(2,)`` or the impl's
    key shape). Refused: integers (a seed is not a key), floats, arrays of
    several keys.
    """
    if key is None:
        return
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{name} must be one PRNG key, got an array of keys of shape {key.shape}; pass key[0].")
        return
    if isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.ndim == 1 and key.size in (2, 4):
        return
    got = f"{type(key).__name__} {key!r}" if np.ndim(key) == 0 else f"{type(key).__name__} of shape {np.shape(key)}"
    raise ValueError(
        f"{name} must be a PRNG key such as jax.random.key(0) (or jax.random.PRNGKey(0)), got {got}. "
        "An integer seed is not a key: pass jax.random.key(seed)."
    )


def check_like_training(batch: PyTree, reference: PyTree, name: str) -> None:
    """Raise ``ValueError`` unless ``batch`` has the tree structure and per-example leaf shapes of ``reference``."""
    ref_flat, ref_def = jax.tree_util.tree_flatten_with_path(reference)
    flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
    if treedef != ref_def:
        raise ValueError(f"{name} has tree structure {treedef}, but the training batches have {ref_def}.")
    for (path, leaf), (_, ref) in zip(flat, ref_flat):
        if np.shape(leaf)[1:] != np.shape(ref)[1:]:
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} has per-example shape {np.shape(leaf)[1:]} (shape "
                f"{np.shape(leaf)}), but the training batches have {np.shape(ref)[1:]}: every leaf of a batch is "
                "(examples, *per-example shape), with the per-example shape of the training data."
            )


# ----------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------


def _check_batch(batches) -> tuple[PyTree, int, int] | None:
    """The first batch with at least two examples, how many of its first examples to check, and its index."""
    for index, batch in enumerate(batches):
        n = batch_size(batch)
        if n >= 2:
            return batch, min(n, CHECK_EXAMPLES), index
    return None


def _values_eager(loss_fns: tuple, params, batch, k: int, i: int | None = None):
    """Per loss: its value on the first ``k`` examples of ``select(batch, i)``, on each alone, on the first k // 2."""
    batch = select(batch, i)
    head, first = take(batch, slice(0, k)), take(batch, slice(0, k // 2))
    return tuple((fn(params, head), per_example_losses(fn, params, head), fn(params, first)) for fn in loss_fns)


_values_jit = jax.jit(_values_eager, static_argnums=(0, 3, 4), compiler_options=CHECK_COMPILER_OPTIONS)


def _hashable(fns: tuple) -> bool:
    try:
        hash(fns)
    except TypeError:  # an unhashable callable cannot be a static argument
        return False
    return True


def _values(loss_fns: tuple, params, batch, k: int, i: int | None = None):
    """:func:`_values_eager`, compiled when every loss is hashable (an unhashable one runs op by op)."""
    return (_values_jit if _hashable(loss_fns) else _values_eager)(loss_fns, params, batch, k, i)


def check_loss(loss_fn: Callable, params: PyTree, batches, *, name: str = "loss_fn") -> None:
    """Check that ``loss_fn(params, batch)`` is a finite scalar equal to the mean of its per-example values.

    On the first :data:`CHECK_EXAMPLES` examples ``B`` of the first batch
    holding at least two, ``loss_fn(params, B)`` must equal the mean of
    ``loss_fn`` on each example alone (a batch of one along the leading axis
    of every leaf) to ``10·√eps`` relative. A parameter-only term (a
    regulariser) is part of every per-example loss and passes. A sum over the
    examples is recognised (``loss(B) = Σ_i loss(z_i) − (|B| − 1)·R`` for a
    parameter-only ``R``, checked on ``B`` and on its first half) and named
    as such.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the parameters.
      batches: an iterable of batches (e.g. ``Batches.batches()``).
      name: how to call the loss in messages.

    Raises:
      ValueError: a non-scalar or non-float result, NaN or inf, a sum instead
        of a mean, or any other loss that is not the mean over axis 0 (e.g.
        time-major data, batch statistics).
    """
    check_losses(((loss_fn, name),), params, batches)


def check_losses(forms, params: PyTree, batches) -> None:
    """:func:`check_loss` for each ``(loss_fn, name)`` of ``forms`` in turn, their values in one compiled program."""
    found = _check_batch(batches)
    if found is None:
        return  # batches of one example: the mean and the sum coincide
    batch, k, index = found
    _check_values(_shapes_checked(forms, params, batch, k, index), params, batch, k, index)


def _shapes_checked(forms, params, batch, k: int, index: int, i: int | None = None) -> list:
    """``(loss_fn, name, dtype)`` of each form, once its output on ``k`` examples of ``select(batch, i)`` is a float
    scalar; for the first that is not, the values of the earlier forms are checked, then ``ValueError``."""
    checked = []
    for loss_fn, name in forms:
        out = jax.eval_shape(lambda p, b, fn=loss_fn: fn(p, take(select(b, i), slice(0, k))), params, batch)
        if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
            _check_values(checked, params, batch, k, index, i)  # the earlier forms first, as they come
            got = f"shape {out.shape}, dtype {out.dtype}" if hasattr(out, "shape") else type(out).__name__
            raise ValueError(
                f"{name} must return the mean loss over the batch, a float scalar; on a batch of {k} it returns "
                f"{got}. Average the per-example losses (jnp.mean)."
            )
        checked.append((loss_fn, name, out.dtype))
    return checked


def _check_values(checked: list, params: PyTree, batch, k: int, index: int, i: int | None = None) -> None:
    """Raise for the first ``(loss_fn, name, dtype)`` of ``checked`` whose values are not finite or not a mean."""
    if checked:
        _raise_values(checked, _values(tuple(fn for fn, _, _ in checked), params, batch, k, i), k, index)


def _raise_values(checked: list, values: tuple, k: int, index: int) -> None:
    """Raise for the first form of ``checked`` whose ``values`` (of :func:`_values_eager`) fail the check."""
    where = f"the first {k} examples of training batch {index}"
    for (_, name, dtype), triple in zip(checked, values):
        total, each, half = (np.asarray(x, np.float64) for x in triple)
        if not (np.isfinite(total) and np.all(np.isfinite(each))):
            raise ValueError(
                f"{name} is NaN or inf on {where} (value {float(total):.6g}): check the params, the data and the "
                "loss (log of 0, division by zero, overflow)."
            )
        rtol = 10 * math.sqrt(float(jnp.finfo(dtype).eps))
        mean, scale = float(np.mean(each)), max(abs(total), float(np.mean(np.abs(each))))
        if abs(total - mean) > rtol * scale + float(jnp.finfo(dtype).tiny):
            raise ValueError(_not_a_mean(name, where, k, float(total), each, float(half), rtol))


def _not_a_mean(name: str, where: str, k: int, total: float, each: np.ndarray, half: float, rtol: float) -> str:
    summed, mean, h = float(np.sum(each)), float(np.mean(each)), k // 2
    if k >= 4:  # fit loss(B) = Σ loss(z_i) − (k − 1) R on B, predict the first half
        reg = (summed - total) / (k - 1)
        predicted = float(np.sum(each[:h])) - (h - 1) * reg
        is_sum = abs(predicted - half) <= rtol * max(abs(half), float(np.sum(np.abs(each[:h])))) * 10
    else:
        reg, is_sum = 0.0, abs(total - summed) <= rtol * max(abs(total), abs(summed)) * 10
    if is_sum:
        extra = f" plus a parameter-only term of {reg:.4g}, which may stay as it is" if abs(reg) > 0 else ""
        return (
            f"{name} sums over the examples instead of averaging: on {where} it gives {total:.6g}, the sum of its "
            f"per-example values{extra} (their mean is {mean:.6g}). Influences assume the mean loss and would be off "
            "by the batch size (and depend on the batching): divide by the batch size (jnp.mean instead of jnp.sum)."
        )
    return (
        f"{name} is not the mean of per-example losses over the leading axis of the batch: on {where} it gives "
        f"{total:.6g}, but the mean of its values on each example alone (a batch of one along axis 0 of every "
        f"leaf) is {mean:.6g}. jaxinf reads axis 0 of every leaf as the example axis: if the data is time-major "
        "(T, B, ...), put the example axis first (e.g. jnp.swapaxes(x, 0, 1)); a loss that couples examples "
        "(batch statistics, a normalisation over the whole batch) has no per-example influence."
    )


# ----------------------------------------------------------------------------
# The curvature
# ----------------------------------------------------------------------------


def _probe_norms_eager(operator: CurvatureOperator, batch, probes, k: int = 0, i: int | None = None):
    """``(‖C v‖, ‖v‖, finite)`` per probe ``v``: on ``k`` examples of ``select(batch, i)``, or all data (``None``)."""
    batch = None if batch is None else take(select(batch, i), slice(0, k))

    def one(v):
        if batch is None:
            cv = operator.block_curvature_vp(v)
        else:
            cv = operator.batch_block_curvature_vp(batch, v)
        return tree_norm(cv), tree_norm(v), tree_all_finite(cv)

    return jax.vmap(one)(probes)


_probe_norms = jax.jit(_probe_norms_eager, static_argnums=(3, 4), compiler_options=CHECK_COMPILER_OPTIONS)


@functools.partial(jax.jit, static_argnums=(0, 4, 5), compiler_options=CHECK_COMPILER_OPTIONS)
def _fit_checks(loss_fns: tuple, operator: CurvatureOperator, batch, probes, k: int, i: int | None):
    """:func:`check_fit`'s one program: :func:`_values_eager` and :func:`_probe_norms_eager` on the same examples."""
    return _values_eager(loss_fns, operator.params, batch, k, i), _probe_norms_eager(operator, batch, probes, k, i)


def _probes(operator: CurvatureOperator, count: int = 2):
    """``count`` Gaussian vectors shaped like the params (NumPy's generator: nothing to compile)."""
    rng = np.random.default_rng(0)
    leaves = [rng.standard_normal((count, *s)).astype(d) for s, d in zip(operator.spec.shapes, operator.spec.dtypes)]
    return jax.tree.unflatten(operator.spec.treedef, leaves)


def check_curvature(operator: CurvatureOperator, *, name: str | None = None) -> None:
    """Raise ``ValueError`` when the (block-diagonal, undamped) curvature is zero or not finite.

    Two products ``C v`` with random Gaussian ``v`` run on the first
    :data:`CHECK_EXAMPLES` examples of the first batch with at least two; a
    zero there is confirmed on the whole dataset before raising. ``C v = 0``
    for a random ``v`` means ``C = 0`` (almost surely): then ``(C + λI)⁻¹ =
    I/λ`` and every solver returns plain gradient dot products.

    Args:
      operator: the curvature operator to be fitted.
      name: how to call the loss in messages (default: from the operator).

    Raises:
      ValueError: NaN or inf in a product, or a curvature of exactly zero
        (e.g. a Gauss-Newton split whose output loss is linear in the model
        outputs, such as a model ending in ``log_softmax`` with a
        negative-log-likelihood output loss); the message names the split and
        the fix.
    """
    found = operator.data.first_source(2)  # as _check_batch, without indexing a stack on the host
    batch, i, k = (found[0], found[1], min(found[2], CHECK_EXAMPLES)) if found is not None else (None, None, 0)
    probes = _probes(operator)
    _raise_curvature(operator, _probe_norms(operator, batch, probes, k, i), probes, found is not None, name)


def _raise_curvature(operator: CurvatureOperator, result, probes, on_batch: bool, name: str | None) -> None:
    """Raise for products ``result`` (of :func:`_probe_norms_eager`) that are not finite or all zero."""
    norms, sizes, finite = (np.asarray(x) for x in result)
    where = "the first training batch" if on_batch else "the training data"
    if not np.all(finite):
        raise ValueError(
            f"The {operator.kind} curvature of {name or _loss_name(operator)} gives NaN or inf products on {where} "
            "at these params: check the loss for log of 0, division by zero or overflow at these params."
        )
    tiny = float(jnp.finfo(operator.dtype).tiny)
    if np.all(norms <= tiny * sizes) and on_batch:
        norms, sizes, _ = (np.asarray(x) for x in _probe_norms(operator, None, probes, 0, None))  # on all data
    if np.all(norms <= tiny * sizes):
        raise ValueError(_zero_message(operator, name))


def _loss_name(operator: CurvatureOperator) -> str:
    if operator.kind == "gauss_newton":
        model, output = function_name(operator.model_fn), function_name(operator.output_loss)
        return f"the split model_fn={model}, output_loss={output}"
    return f"loss_fn={function_name(operator.loss_fn)}"


def _zero_message(operator: CurvatureOperator, name: str | None) -> str:
    what = name or _loss_name(operator)
    head = f"The {operator.kind} curvature of {what} is exactly zero on the training data, "
    if operator.kind == "gauss_newton":
        return head + (
            "because output_loss is linear in the model outputs (e.g. a model ending in log_softmax with a "
            "negative-log-likelihood output loss, whose Hessian in the outputs is 0). Every solver would return "
            "plain gradient dot products divided by the damping. Make model_fn return the logits and output_loss "
            "a softmax cross-entropy on them (optax.softmax_cross_entropy_with_integer_labels), or use "
            "curvature='hessian'."
        )
    if operator.kind == "fisher":
        return head + (
            "because every per-example gradient is zero at these params: influences would all be zero. Check the "
            "params (are these the trained ones?) and the loss."
        )
    return head + (
        "(a loss linear in the parameters): every solver would return plain gradient dot products divided by the "
        "damping. Check the loss, or use curvature='fisher'."
    )


def check_fit(
    operator: CurvatureOperator,
    loss_fn: Callable | None = None,
    model_fn: Callable | None = None,
    output_loss: Callable | None = None,
) -> None:
    """The fit-time checks on the operator's data: every given form of the loss, then the curvature.

    ``loss_fn`` (when given) and the split ``output_loss(model_fn(params, batch), batch)`` (when both halves are
    given) must each pass :func:`check_loss`; the curvature must pass :func:`check_curvature`. The values of every
    form and the curvature probes are computed by one compiled program, then checked in that order.
    """
    forms = [] if loss_fn is None else [(loss_fn, "loss_fn")]
    if model_fn is not None and output_loss is not None:
        composed = SplitLoss(model_fn, output_loss)  # hashable by the pair: compiled once, not at every fit
        forms.append((composed, "output_loss(model_fn(params, batch), batch)"))
    found, fns = operator.data.first_source(2), tuple(fn for fn, _ in forms)
    if found is None or not _hashable(fns):  # batches of one example, or a loss that cannot be a static argument
        check_losses(forms, operator.params, operator.data.batches())
        check_curvature(operator)
        return
    batch, i, k, index = found[0], found[1], min(found[2], CHECK_EXAMPLES), found[3]
    checked = _shapes_checked(forms, operator.params, batch, k, index, i)  # raises first, in the order of forms
    probes = _probes(operator)
    values, norms = _fit_checks(fns, operator, batch, probes, k, i)  # every form and the curvature: one program
    _raise_values(checked, values, k, index)
    _raise_curvature(operator, norms, probes, True, None)
