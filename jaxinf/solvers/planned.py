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
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.memory import available_bytes, extra_bytes, plan_rows, take_rows
from jaxinf.solvers import compiled

__all__ = ["ADVICE", "FREE_FRACTION", "Planner", "check_budget"]

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


def _trim(tree, axis: int, rows: int, valid: int):
    """Drop the padded examples: leaves whose ``axis`` has ``rows`` entries keep the first ``valid``."""
    if valid == rows:
        return tree

    def cut(x):
        return jax.lax.slice_in_dim(x, 0, valid, axis=axis) if np.ndim(x) > axis and x.shape[axis] == rows else x

    return jax.tree.map(cut, tree)


def _concat(parts: list, axis: int):
    return parts[0] if len(parts) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=axis), *parts)


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

    def map(self, what: str, jitted, args: tuple, *, row_arg: int, out_axis: int):
        """``jitted(*args)`` with ``args[row_arg]`` cut into chunks of examples; outputs joined along ``out_axis``."""
        batch = args[row_arg]
        n = _rows_of(batch)

        def at(start, rows):
            return (*args[:row_arg], take_rows(batch, start, rows), *args[row_arg + 1 :])

        rows = self.rows(what, (jitted, _signature(args)), lambda r: extra_bytes(jitted, *at(0, r)), n)
        parts = [_trim(jitted(*at(s, rows)), out_axis, rows, min(rows, n - s)) for s in range(0, n, rows)]
        return _concat(parts, out_axis)

    def chunks(self, what: str, batch, key, measure):
        """The examples of ``batch`` in chunks of planned size: ``(chunk padded to the size, valid examples)``."""
        n = _rows_of(batch)
        rows = self.rows(what, (key, _signature(batch)), measure, n)
        for start in range(0, n, rows):
            yield take_rows(batch, start, rows), min(rows, n - start)

    # ----------------------------------------------------------- the model's steps
    def solved(self, solver, state, fn, params, batch):
        """Per chunk of test examples: ``(gradients of fn, factors, info)``, padding dropped."""

        def measure(r):
            part = take_rows(batch, 0, r)
            grads = jax.eval_shape(compiled.example_grads, fn, params, part)
            return extra_bytes(compiled.example_grads, fn, params, part) + extra_bytes(
                compiled.solve_all, state, grads, solver=solver
            )

        for part, valid in self.chunks("test gradients and factors", batch, (fn, solver), measure):
            rows = _rows_of(part)
            grads = compiled.example_grads(fn, params, part)
            factors, info = compiled.solve_all(state, grads, solver=solver)
            yield _trim(grads, 0, rows, valid), _trim(factors, 0, rows, valid), _trim(info, 0, rows, valid)

    def scored(self, scorer, state, operator, test_batch, train_batches: list):
        """A scorer's ``(n_test, n_train)``: ``prepare`` per chunk of test examples, ``finish`` per training chunk."""

        def measure(r):
            return extra_bytes(compiled.call, scorer.prepare, state, operator, take_rows(test_batch, 0, r))

        rows = []
        for part, valid in self.chunks("scorer.prepare (test side)", test_batch, scorer.prepare, measure):
            prepared = compiled.call(scorer.prepare, state, operator, part)
            cols = [
                self.map("scorer.finish (training side)", compiled.call, (scorer.finish, state, operator, prepared, rb),
                         row_arg=4, out_axis=1)
                for rb in train_batches
            ]
            rows.append(jnp.concatenate(cols, axis=1)[:valid])
        return jnp.concatenate(rows, axis=0)
