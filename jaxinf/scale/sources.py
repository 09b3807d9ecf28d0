"""Batch sources: datasets read batch by batch, never held in memory whole.

A *source* yields the batches of one (possibly process-local) part of a
dataset in a fixed order, can start again from any batch index (for resumed
runs), and knows where its examples sit in the whole dataset:

* :class:`ArraySource` slices a pytree of array-likes with a leading example
  axis: numpy arrays, ``np.memmap``, zarr or h5py arrays, anything with
  ``.shape`` and slicing. Only the batch being read is loaded. Starting at
  batch ``j`` costs nothing.
* :class:`IterableSource` wraps a *factory* returning a fresh iterator of
  batches (a grain or ``tf.data`` pipeline, a generator function). Starting at
  batch ``j`` re-reads and discards the first ``j`` batches (no compute).
* :func:`as_source` turns one in-memory batch or a list of batches into a
  source, so every entry point takes the same kinds of data.

Every batch has ``batch_size`` examples except possibly the last. For
multi-process runs, :meth:`ArraySource.shard` gives each process a contiguous
range that starts on a multiple of ``batch_size`` (so processes never write
the same chunk of the on-disk result) and :attr:`offset` /
:attr:`total_examples` place it in the whole dataset.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

from jaxinf.core.data import Batches, read_batches
from jaxinf.core.data import batch_size as leading_size

PyTree = Any

__all__ = ["ArraySource", "IterableSource", "ListSource", "as_source", "process_range"]


def process_range(num_examples: int, batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The examples ``[start, stop)`` of process ``process_index`` out of ``process_count``.

    Every process gets ``ceil(n / (P·b))·b`` examples (the last one fewer, and
    possibly none), so every range starts on a multiple of the batch size.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
    per = math.ceil(num_examples / (process_count * batch_size)) * batch_size
    start = min(process_index * per, num_examples)
    return start, min(start + per, num_examples)


class _Source:
    """Shared bookkeeping: sizes, offsets, steps."""

    num_examples: int
    batch_size: int
    offset: int = 0
    total_examples: int

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def batch_bounds(self, j: int) -> tuple[int, int]:
        """Global example indices ``[start, stop)`` of batch ``j``."""
        start = self.offset + j * self.batch_size
        return start, min(start + self.batch_size, self.offset + self.num_examples)

    def __iter__(self):
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[PyTree]:  # pragma: no cover - abstract
        raise NotImplementedError

    def first(self) -> PyTree:
        """The first batch (to read shapes and dtypes)."""
        return next(self.batches())


class ArraySource(_Source):
    """Batches sliced from a pytree of array-likes (numpy, ``np.memmap``, zarr, h5py).

    Args:
      data: a batch pytree whose leaves share a leading example axis; leaves
        are sliced lazily (``leaf[i:j]``) and converted with ``np.asarray``.
      batch_size: examples per batch (the last batch may be smaller).
      start, stop: restrict to the examples ``[start, stop)`` (default: all).
      total_examples: size of the whole dataset when ``data`` is already one
        process's part of it (with ``offset``); default: ``len(data)``.
      offset: global index of ``data[start]``; default ``start``.

    Examples:
      >>> import numpy as np
      >>> src = ArraySource((np.arange(10.0)[:, None], np.arange(10)), batch_size=4)
      >>> [b[1].tolist() for b in src]
      [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
      >>> src.shard(1, 2).batch_bounds(0)
      (8, 10)
    """

    def __init__(
        self,
        data: PyTree,
        batch_size: int,
        *,
        start: int = 0,
        stop: int | None = None,
        total_examples: int | None = None,
        offset: int | None = None,
    ):
        leaves = jax.tree.leaves(data)
        if not leaves:
            raise ValueError("ArraySource needs a pytree with at least one array leaf.")
        sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
        if len(sizes) != 1 or -1 in sizes:
            raise ValueError(
                f"Every leaf of the data must share the leading example axis; got leading sizes {sorted(sizes)}."
            )
        length = sizes.pop()
        stop = length if stop is None else int(stop)
        if not 0 <= start <= stop <= length:
            raise ValueError(f"Need 0 <= start <= stop <= {length}, got start={start}, stop={stop}.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.data = data
        self.batch_size = int(batch_size)
        self.start, self.stop = int(start), stop
        self.num_examples = stop - start
        self.offset = self.start if offset is None else int(offset)
        self.total_examples = length if total_examples is None else int(total_examples)

    def batch(self, j: int) -> PyTree:
        """Batch ``j`` as numpy arrays (reads only those rows)."""
        if not 0 <= j < self.num_batches:
            raise IndexError(f"batch {j} out of range (0..{self.num_batches - 1}).")
        lo = self.start + j * self.batch_size
        hi = min(lo + self.batch_size, self.stop)
        return jax.tree.map(lambda a: np.asarray(a[lo:hi]), self.data)

    def batches(self, start: int = 0) -> Iterator[PyTree]:
        for j in range(start, self.num_batches):
            yield self.batch(j)

    def shard(self, process_index: int | None = None, process_count: int | None = None) -> ArraySource:
        """This process's contiguous part (default: ``jax.process_index()`` of ``jax.process_count()``)."""
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        lo, hi = process_range(self.num_examples, self.batch_size, index, count)
        return ArraySource(
            self.data,
            self.batch_size,
            start=self.start + lo,
            stop=self.start + hi,
            total_examples=self.num_examples,
            offset=self.offset + lo,
        )


class IterableSource(_Source):
    """Batches from a factory of iterators (grain, ``tf.data``, a generator function).

    Args:
      factory: ``factory() -> iterable of batches``; called again to restart.
        Batches must hold ``batch_size`` examples except the last.
      num_examples: examples the iterator yields in total.
      batch_size: examples per batch.
      offset: global index of the first example (multi-process parts).
      total_examples: size of the whole dataset (default ``num_examples``).
    """

    def __init__(
        self,
        factory: Callable[[], Iterable[PyTree]],
        *,
        num_examples: int,
        batch_size: int,
        offset: int = 0,
        total_examples: int | None = None,
    ):
        if not callable(factory):
            raise TypeError(
                "IterableSource needs a factory, a function returning a fresh iterator of batches "
                "(e.g. lambda: iter(loader)), so that a resumed run can read the data again."
            )
        if int(num_examples) < 1 or int(batch_size) < 1:
            raise ValueError(f"num_examples and batch_size must be >= 1, got {num_examples}, {batch_size}.")
        self.factory = factory
        self.num_examples = int(num_examples)
        self.batch_size = int(batch_size)
        self.offset = int(offset)
        self.total_examples = self.num_examples if total_examples is None else int(total_examples)

    def batches(self, start: int = 0) -> Iterator[PyTree]:
        seen = 0
        for j, batch in enumerate(self.factory()):
            if j >= self.num_batches:
                raise ValueError(
                    f"The iterator yields more than num_examples={self.num_examples} examples "
                    f"({self.num_batches} batches of {self.batch_size}); fix num_examples."
                )
            size = leading_size(batch, f"batch {j}")
            lo, hi = self.batch_bounds(j)
            if size != hi - lo:
                raise ValueError(
                    f"Batch {j} has {size} examples but {hi - lo} were expected (batch_size={self.batch_size}, "
                    f"num_examples={self.num_examples}); every batch but the last must be full."
                )
            seen += size
            if j >= start:
                yield batch
        if seen != self.num_examples:
            raise ValueError(f"The iterator yielded {seen} examples, but num_examples={self.num_examples}.")


class ListSource(_Source):
    """An in-memory batch or list of batches (all of ``batch_size`` but the last)."""

    def __init__(self, batches: list, *, offset: int = 0, total_examples: int | None = None):
        if not batches:
            raise ValueError("The data holds no batches.")
        sizes = [leading_size(b, f"batch {i}") for i, b in enumerate(batches)]
        if any(s != sizes[0] for s in sizes[:-1]) or sizes[-1] > sizes[0]:
            raise ValueError(
                f"Streamed collections need batches of one size except a smaller last one; got sizes {sizes}. "
                "Re-batch the data, or pass arrays with ArraySource(data, batch_size)."
            )
        self._batches = batches
        self.batch_size = sizes[0]
        self.num_examples = sum(sizes)
        self.offset = int(offset)
        self.total_examples = self.num_examples if total_examples is None else int(total_examples)

    def batches(self, start: int = 0) -> Iterator[PyTree]:
        yield from self._batches[start:]


def as_source(data: Any, batch_size: int | None = None) -> _Source:
    """A source for ``data``: a source (returned as is), one batch, a list of batches or a :class:`Batches`.

    With ``batch_size``, one batch of array-likes becomes an :class:`ArraySource`
    cut into batches of that size (a list of batches is then re-cut too).
    """
    if isinstance(data, _Source):
        if batch_size is not None and batch_size != data.batch_size:
            raise ValueError(f"The source has batch_size={data.batch_size}; got batch_size={batch_size}.")
        return data
    if isinstance(data, Batches):
        data = list(data.batches())
    batches = read_batches(data)
    if batch_size is not None:
        if len(batches) == 1:
            return ArraySource(batches[0], batch_size)
        merged = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *batches)
        return ArraySource(merged, batch_size)
    return ListSource(batches)
