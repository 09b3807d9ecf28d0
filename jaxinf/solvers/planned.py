"""The jitted steps of :class:`jaxinf.InfluenceModel`, run over a batch's examples in chunks that fit in memory.

Scoring holds temporaries that grow with the product of test and training
points: ``"gradients"`` keeps ``B`` per-example gradients, ``"jvp"`` pushes
``T`` tangents through ``B`` examples at once, the per-layer contraction of
a convolution (:mod:`jaxinf.scoring.layerwise`) convolves every training
input with all ``T`` factors as kernels (``B × T·d_out × locations``; for
EK-FAC in float64 on a 5,110-parameter CNN with 1,000 × 1,000 points that is
15.4 GB, and the test-side ``prepare`` holds as much). A :class:`Planner`
reads each step's bytes from XLA's compiled memory analysis before it runs
(:func:`jaxinf.core.memory.plan_rows`): the step runs at once if it fits in
the budget (the program analysed is the one that then runs: no extra
compile), else over chunks of examples — training examples for the columns,
test examples for the factors and a scorer's ``prepare`` — padded to one
shape so that one program serves every chunk; if one example does not fit,
it raises with the number. Chunking changes no number: every output column
(or row) depends on its own example only.

The same holds across the batches of a list: a ragged batch (the last 40 of
1,000 examples in batches of 64) is padded to the size of the largest batch
of the call (:func:`pad_rows`, repeating its last example) and runs the
programs of the full batches, instead of compiling every step again for its
shape. The padded rows' outputs are dropped when the parts are joined, once,
at the end (:func:`join`), so padding changes no number either. Only
per-example steps are padded; a mean over a batch (the loss, a curvature
product in a fit) is never padded here.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.memory import available_bytes, extra_bytes, on_one_cpu_device, plan_rows, put_like, rows_at, take_rows
from jaxinf.solvers import compiled

__all__ = ["ADVICE", "FREE_FRACTION", "Planner", "check_budget", "common_rows", "host_rows", "join", "pad_rows"]

#: The share of the free memory a step may plan for when no ``memory_budget_bytes`` is given.
FREE_FRACTION = 0.75

ADVICE = (
    "Pass fewer test points per call (split test_data), smaller training batches, a narrower dtype "
    "(factor_dtype=jnp.float32), or raise memory_budget_bytes if you know it fits."
)


def check_budget(budget: Any) -> int | None:
    """``budget`` as bytes (``None``: the free memory at each call); ``ValueError`` unless a positive int."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise ValueError(f"memory_budget_bytes must be a positive int (bytes) or None (free memory), got {budget!r}.")
    return int(budget)


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((np.shape(x), jnp.result_type(x)) if hasattr(x, "shape") else x for x in leaves)


def _rows_of(tree) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def common_rows(batches: list) -> int:
    """The rows every batch of a call is padded to: the largest batch's (one program for all of them)."""
    return max(_rows_of(b) for b in batches)


def pad_rows(batch, rows: int):
    """``batch`` with its last example repeated up to ``rows`` examples (``batch`` itself if it has them).

    Padding compiles nothing for host arrays and arrays held on one device
    (:func:`jaxinf.core.memory.rows_at`); arrays spread over several devices
    are padded on them.
    """
    n = _rows_of(batch)
    if n >= rows:
        return batch
    index = np.minimum(np.arange(rows), n - 1)
    return jax.tree.map(lambda x: rows_at(x, index), batch)


def host_rows(tree, valid: int):
    """The first ``valid`` rows of every leaf of ``tree``, as host arrays (no compile; e.g. to check or report)."""
    return jax.tree.map(lambda x: np.asarray(x)[:valid], tree)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _join(parts: tuple, valid: tuple, axis: int):
    def cut(x, v):
        return jax.lax.slice_in_dim(x, 0, v, axis=axis) if np.ndim(x) > axis else x

    return jax.tree.map(lambda *xs: jnp.concatenate([cut(x, v) for x, v in zip(xs, valid)], axis=axis), *parts)


def join(parts: list, valid: list, axis: int):
    """The ``parts`` (pytrees) joined along ``axis``, keeping the first ``valid[k]`` entries of part ``k``.

    One compiled program per layout of parts: a list whose last batch is
    ragged (padded to the full size) joins with the program's count of a
    list of equal batches.
    """
    if len(parts) == 1 and valid[0] == jax.tree.leaves(parts[0])[0].shape[axis]:
        return parts[0]
    if all(on_one_cpu_device(x) for x in jax.tree.leaves(parts)):  # a memory copy on the host: nothing compiled

        def host(*xs):
            cut = [np.asarray(x)[(slice(None),) * axis + (slice(0, v),)] for x, v in zip(xs, valid)]
            return put_like(np.concatenate(cut, axis=axis), xs[0])

        return jax.tree.map(host, *parts)
    return _join(tuple(parts), tuple(int(v) for v in valid), axis)


# Planned chunk sizes, shared by every model (as the compiled programs are): a second model of the same loss, solver,
# shapes and budget measures nothing. With the default budget (free memory) the first measurement is kept.
_ROWS: dict = {}


class Planner:
    """Chunk sizes per step and shapes, checked against ``budget_bytes`` (``None``: the free memory now)."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = check_budget(budget_bytes)
        self.last_rows: dict[str, int] = {}  # what -> examples per call of the last planned step (for reports, tests)

    def budget(self) -> int:
        """``budget_bytes``, else :data:`FREE_FRACTION` of the free memory (XLA's count leaves out fragmentation)."""
        return int(FREE_FRACTION * available_bytes()) if self.budget_bytes is None else self.budget_bytes

    def rows(self, what: str, key, measure, n: int) -> int:
        """Examples per call of step ``what`` on ``n`` examples (cached by ``key``: the step and its shapes)."""
        budget = self.budget()
        key = (what, key, n, budget if self.budget_bytes is not None else None)
        if key not in _ROWS:
            _ROWS[key] = plan_rows(measure, n, budget, what, ADVICE)
        self.last_rows[what] = _ROWS[key]
        return _ROWS[key]

    def map(self, what: str, jitted, args: tuple, *, row_arg: int, out_axis: int, size: int | None = None):
        """``jitted(*args)`` with ``args[row_arg]`` cut into chunks of examples; outputs joined along ``out_axis``."""
        return join(*self.map_parts(what, jitted, args, row_arg=row_arg, size=size), out_axis)

    def map_parts(self, what: str, jitted, args: tuple, *, row_arg: int, size: int | None = None):
        """``(parts, valid)`` of :meth:`map`, not joined (their padded entries kept: :func:`join` drops them);
        ``size``: pad the batch to that many examples first (:func:`pad_rows`)."""
        n = _rows_of(args[row_arg])
        batch = pad_rows(args[row_arg], size or n)

        def at(start, rows):
            return (*args[:row_arg], take_rows(batch, start, rows), *args[row_arg + 1 :])

        args = at(0, _rows_of(batch))
        rows = self.rows(what, (jitted, _signature(args)), lambda r: extra_bytes(jitted, *at(0, r)), _rows_of(batch))
        return [jitted(*at(s, rows)) for s in range(0, n, rows)], [min(rows, n - s) for s in range(0, n, rows)]

    def chunks(self, what: str, batch, key, measure, n: int | None = None):
        """The first ``n`` (default: all) examples of ``batch`` in chunks of planned size: ``(chunk padded to the
        size, valid examples)``."""
        n = _rows_of(batch) if n is None else n
        rows = self.rows(what, (key, _signature(batch)), measure, _rows_of(batch))
        for start in range(0, n, rows):
            yield take_rows(batch, start, rows), min(rows, n - start)

    # ----------------------------------------------------------- the model's steps
    def solved(self, solver, state, fn, params, batch, size: int | None = None):
        """Per chunk of test examples: ``(gradients of fn, factors, info, valid, finite)``.

        ``batch`` is padded to ``size`` examples first (:func:`pad_rows`);
        gradients and factors keep the padded rows (join them with
        :func:`join`), ``info`` (host arrays) has the ``valid`` rows only;
        ``finite``: whether every factor is finite (for ``check_solve``).
        """
        n = _rows_of(batch)
        batch = pad_rows(batch, size or n)

        def measure(r):
            part = take_rows(batch, 0, r)
            grads = jax.eval_shape(compiled.example_grads, fn, params, part)
            return extra_bytes(compiled.example_grads, fn, params, part) + extra_bytes(
                compiled.solve_all, state, grads, solver=solver
            )

        for part, valid in self.chunks("test gradients and factors", batch, (fn, solver), measure, n):
            grads = compiled.example_grads(fn, params, part)
            factors, info, finite = compiled.solve_all(state, grads, solver=solver)
            yield grads, factors, host_rows(info, valid), valid, finite

    def scored(self, scorer, state, operator, test_batches: list, train_batches: list):
        """A scorer's ``(n_test, n_train)``: ``prepare`` per chunk of test examples, ``finish`` per training chunk.

        Every batch of each side runs at the size of that side's largest
        (:func:`pad_rows`); the padded rows and columns are dropped at the end.
        """
        test_size, train_size = common_rows(test_batches), common_rows(train_batches)
        rows, row_valid = [], []
        for test_batch in test_batches:
            n, test_batch = _rows_of(test_batch), pad_rows(test_batch, test_size)

            def measure(r, test_batch=test_batch):
                return extra_bytes(compiled.call, scorer.prepare, state, operator, take_rows(test_batch, 0, r))

            for part, valid in self.chunks("scorer.prepare (test side)", test_batch, scorer.prepare, measure, n):
                prepared = compiled.call(scorer.prepare, state, operator, part)
                cols, col_valid = [], []
                for train_batch in train_batches:
                    args = (scorer.finish, state, operator, prepared, train_batch)
                    got = self.map_parts(
                        "scorer.finish (training side)", compiled.call, args, row_arg=4, size=train_size
                    )
                    cols, col_valid = cols + got[0], col_valid + got[1]
                rows.append(join(cols, col_valid, axis=1))
                row_valid.append(valid)
        return join(rows, row_valid, axis=0)
