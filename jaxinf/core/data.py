"""Datasets as batches: one batch, or a collection of batches of any sizes.

A *batch* is any pytree of arrays whose leaves share a leading (example) axis
of size at least one, e.g. ``(x, y)`` or ``{"image": x, "label": y}``. A
*collection* is a ``list`` of batches, or any other iterable of batches (a
generator, a data loader). Tuples, dicts and NamedTuples are always read as
one batch. :func:`as_batches` reads a collection exactly once, so a one-shot
generator is accepted; code that needs the data twice keeps the
:class:`Batches` it returns (an exhausted generator is refused by name).

:class:`Batches` stores a collection so that it can be swept inside ``jit``:
the batches that have the size of the first are stacked and visited with
``lax.scan``; batches of other sizes (typically a ragged last batch) are kept
apart and visited after it. :func:`weighted_mean` averages a per-batch
quantity over the whole dataset **weighted by batch size**, so that a ragged
last batch gives exactly the full-data average.
"""

from __future__ import annotations

import collections.abc
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.memory import on_one_cpu_device, put_like
from jaxinf.core.tree import check_finite, readonly_copy, tree_add, tree_scale

PyTree = Any


def batch_size(batch: PyTree, name: str = "batch") -> int:
    """Leading size shared by every leaf of ``batch``; ``ValueError`` otherwise."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError(f"{name} has no array leaves.")
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} is a scalar; every leaf of a batch needs a leading example axis."
            )
        sizes.setdefault(shape[0], []).append(jax.tree_util.keystr(path) or "<root>")
    if len(sizes) > 1:
        detail = "; ".join(f"size {k}: {', '.join(v)}" for k, v in sizes.items())
        raise ValueError(
            f"The leaves of {name} have different leading sizes ({detail}). "
            "Every leaf must hold the same examples along axis 0."
        )
    return next(iter(sizes))


def is_single_batch(data: Any) -> bool:
    """True when ``data`` is read as one batch rather than a collection of batches.

    Lists and iterables that JAX treats as leaves (generators, data loaders)
    are collections; tuples, mappings, arrays and every registered pytree node
    (NamedTuple, ``nnx.State``, dataclasses) are one batch.
    """
    if isinstance(data, list):
        return False
    if isinstance(data, (tuple, collections.abc.Mapping, np.ndarray, jax.Array)):
        return True
    is_leaf = jax.tree_util.all_leaves([data])
    if is_leaf and isinstance(data, collections.abc.Iterable) and not hasattr(data, "shape"):
        return False
    return True


def iterate_batches(data: Any):
    """Yield the batches of ``data`` (one batch or a collection)."""
    if is_single_batch(data):
        yield data
    else:
        yield from data


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Batches:
    """A dataset held as stacked equal-size batches plus batches of other sizes.

    Attributes:
      stacked: pytree whose leaves have shape ``(num_stacked, batch_size, ...)``,
        or ``None`` when there is no group of equal-size batches.
      rest: tuple of batches with other leading sizes (e.g. a ragged last batch).
      order: static; ``order[i]`` is where the ``i``-th batch as given sits in
        the stored order (the stacked batches, then ``rest``), so that
        :meth:`batches` yields the batches, and influence columns follow the
        examples, in the order given. Empty: the stored order.
    """

    stacked: PyTree
    rest: tuple
    order: tuple = ()

    def tree_flatten(self):
        return (self.stacked, self.rest), self.order

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, order=aux)

    @property
    def num_stacked(self) -> int:
        return 0 if self.stacked is None else int(np.shape(jax.tree.leaves(self.stacked)[0])[0])

    @property
    def num_examples(self) -> int:
        n = 0
        if self.stacked is not None:
            shape = np.shape(jax.tree.leaves(self.stacked)[0])
            n += shape[0] * shape[1]
        return n + sum(batch_size(b) for b in self.rest)

    def batches(self):
        """Yield the batches one by one in the order given (host-side; used by non-jitted sweeps)."""
        k = self.num_stacked
        for i in self.order or range(k + len(self.rest)):
            yield _batch_at(self.stacked, i) if i < k else self.rest[i - k]

    def sizes(self) -> list[int]:
        """The number of examples of each batch, in the order given (from shapes: nothing is indexed)."""
        k = self.num_stacked
        each = k * [int(np.shape(jax.tree.leaves(self.stacked)[0])[1])] if k else []
        each += [batch_size(b) for b in self.rest]
        return [each[i] for i in self.order] if self.order else each

    def source(self, index: int) -> tuple[PyTree, int | None]:
        """Batch ``index`` (as given) without indexing on the host: ``(tree, i)``, see :func:`select`."""
        stored, k = (self.order[index] if self.order else index), self.num_stacked
        return (self.stacked, stored) if stored < k else (self.rest[stored - k], None)

    def abstract(self, index: int = 0) -> PyTree:
        """Batch ``index`` (as given) as ``jax.ShapeDtypeStruct`` leaves (its shapes; a stack is not indexed)."""
        tree, i = self.source(index)
        return jax.eval_shape(lambda t: select(t, i), tree)

    def first_source(self, at_least: int) -> tuple[PyTree, int | None, int, int] | None:
        """The first batch (as given) of at least ``at_least`` examples: ``(tree, i, size, index)``, the batch
        ``select(tree, i)``, from shapes (nothing indexed); ``None`` when there is none."""
        for index, n in enumerate(self.sizes()):
            if n >= at_least:
                return (*self.source(index), n, index)
        return None


def select(tree: PyTree, i: int | None) -> PyTree:
    """``tree[i]`` leaf by leaf (a batch of :meth:`Batches.source`), or ``tree`` itself when ``i`` is ``None``.

    Meant for inside ``jit`` (``i`` static), where the indexing compiles no program of its own.
    """
    return tree if i is None else jax.tree.map(lambda a: a[i], tree)


@jax.jit
def _batch_at(stacked: PyTree, i):
    """Batch ``i`` of a stack: one compiled program for every leaf and index (eagerly, two per leaf)."""
    return jax.tree.map(lambda a: a[i], stacked)


def as_batches(data: Any, *, name: str = "data", check_values: bool = True) -> Batches:
    """Read one batch or a collection of batches into :class:`Batches`.

    Args:
      data: a batch pytree, a list of batches or an iterable of batches.
      name: how to call ``data`` in error messages.
      check_values: raise on NaN or inf (host-side; skipped for tracers).

    Raises:
      ValueError: no batches (naming an exhausted iterator), a batch of zero
        examples, leaves with different leading sizes, batches with different
        tree structures or trailing shapes, NaN or inf.
    """
    if isinstance(data, Batches):
        return data
    batches = checked_list(data, name=name, check_values=check_values)
    if len(batches) == 1:
        return Batches(None, (batches[0],))
    sizes = [batch_size(b) for b in batches]
    head = sizes[0]
    same = [i for i, s in enumerate(sizes) if s == head]
    other = [i for i, s in enumerate(sizes) if s != head]
    if len(same) == 1:
        same, other = [], same + other
    stored = same + other  # stored position -> position given
    order = tuple(int(i) for i in np.argsort(stored)) if stored != sorted(stored) else ()
    rest = tuple(batches[i] for i in other)
    if not same:
        return Batches(None, rest, order)
    return Batches(_stack([batches[i] for i in same]), rest, order)


def read_batches(data: Any) -> list:
    """The batches of ``data`` (one batch or a collection) as a list, read once.

    From an iterator (a generator, a data loader) each writeable NumPy leaf is copied as it comes: a loader may
    refill one buffer in place for every batch, and keeping references would leave every batch holding the last.
    """
    if is_single_batch(data) or isinstance(data, list):
        return list(iterate_batches(data))
    return [jax.tree.map(_own, b) for b in data]


class CheckedList(list):
    """Batches that :func:`checked_list` has checked: passed to it again, they are not read again."""


def checked_list(data: Any, *, name: str = "data", check_values: bool = True) -> CheckedList:
    """The batches of ``data`` as a list, in the order given, checked as :func:`as_batches` checks them.

    Nothing is stacked (and so nothing compiled): for host loops that visit
    the batches one by one. A :class:`Batches` gives its batches; a
    :class:`CheckedList` is returned as it is.

    Raises:
      ValueError: as :func:`as_batches`.
    """
    if isinstance(data, CheckedList):
        return data
    if isinstance(data, Batches):
        return CheckedList(data.batches())
    batches = read_batches(data)
    if not batches:
        if isinstance(data, collections.abc.Iterator):
            raise ValueError(
                f"{name} is an iterator ({type(data).__name__}) that yielded no batches: a generator can be read "
                "only once, and this one is empty or already used up. Pass a fresh generator, a list of batches "
                f"(list({name})) or a re-iterable data loader."
            )
        raise ValueError(f"{name} holds no batches; pass one batch or a non-empty list of batches.")
    ref_leaves, ref_def = jax.tree.flatten(batches[0])
    for i, b in enumerate(batches):
        label = f"{name}[batch {i}]" if len(batches) > 1 else name
        leaves, treedef = jax.tree.flatten(b)
        if treedef != ref_def:
            raise ValueError(
                f"{label} has tree structure {treedef}, but the first batch has {ref_def}. "
                "All batches must share one structure."
            )
        for leaf, ref in zip(leaves, ref_leaves):
            if np.shape(leaf)[1:] != np.shape(ref)[1:]:
                raise ValueError(
                    f"{label} has a leaf of per-example shape {np.shape(leaf)[1:]}, but the first batch "
                    f"has {np.shape(ref)[1:]}."
                )
        if batch_size(b, label) == 0:
            raise ValueError(
                f"{label} has 0 examples (leading size 0). Every batch needs at least one example: "
                "drop empty batches (e.g. an empty last batch) before passing the data."
            )
        if check_values:
            check_finite(b, label)
    return CheckedList(batches)


def _own(leaf):
    """A writeable NumPy leaf copied (read-only); any other leaf (a jax.Array is immutable) as it is."""
    return readonly_copy(leaf) if isinstance(leaf, np.ndarray) and leaf.flags.writeable else leaf


def _stack(batches: list) -> PyTree:
    """The batches stacked leaf by leaf, compiling nothing when it can.

    NumPy data is stacked on the host; arrays on one CPU device too (a memory
    copy, put back on their device); anything else (an accelerator, several
    devices) by one compiled program.
    """
    leaves = jax.tree.leaves(batches)
    if all(isinstance(x, np.ndarray) for x in leaves):
        return jax.tree.map(lambda *xs: jax.device_put(np.stack(xs)), *batches)  # dtypes as jnp.asarray gives
    if all(on_one_cpu_device(x) for x in leaves):
        return jax.tree.map(lambda *xs: put_like(np.stack([np.asarray(x) for x in xs]), xs[0]), *batches)
    return _stack_jit(batches)


@jax.jit
def _stack_jit(batches: list) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def weighted_mean(fn: Callable[[PyTree], PyTree], data: Batches) -> PyTree:
    """``sum_b (n_b / n) fn(batch_b)`` over every batch of ``data``.

    ``fn`` returns a *mean* over its batch (a mean loss, a mean curvature
    product), so the size-weighted sum is exactly the mean over all examples,
    whatever the batch sizes. Equal-size batches are visited with ``lax.scan``.
    """
    n = data.num_examples
    total = None
    if data.stacked is not None:
        first = jax.tree.map(lambda a: a[0], data.stacked)
        weight = batch_size(first) / n

        def body(acc, batch):
            return tree_add(acc, tree_scale(weight, fn(batch))), None

        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))
        total, _ = jax.lax.scan(body, zero, data.stacked)
    for b in data.rest:
        term = tree_scale(batch_size(b) / n, fn(b))
        total = term if total is None else tree_add(total, term)
    return total


def take(batch: PyTree, index) -> PyTree:
    """The examples ``index`` of a batch (keeps the leading axis for slices/arrays)."""
    return jax.tree.map(lambda a: a[index], batch)


def add_example_axis(example: PyTree) -> PyTree:
    """A single example as a batch of one."""
    return jax.tree.map(lambda a: jnp.expand_dims(a, 0), example)
