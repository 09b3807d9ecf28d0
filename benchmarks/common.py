"""Shared benchmark helpers: problems, timing, the per-example-gradient floor, result files.

Timing: the first call (compile + run) is timed apart, then the median of
``repeats`` calls, each ended by ``jax.block_until_ready``; ratios (to the
per-example-gradient floor, to another method) are measured in the same run,
because absolute times on a shared machine move from run to run.

Results go to ``benchmarks/results/`` (``results_dir()``), or to
``benchmarks/results/quick/`` during a ``--quick`` run (see ``_cli.py``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import _cli as cli  # benchmarks/ is on sys.path whenever common is importable
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinf.scoring import per_example_grads

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def results_dir() -> str:
    """Where results go: ``RESULTS``, or its ``quick/`` subfolder during a ``--quick`` run."""
    return os.path.join(RESULTS, "quick") if cli.QUICK else RESULTS


class Timing(NamedTuple):
    first: float  # seconds of the first call: compile + run
    median: float  # median seconds of the following calls
    compile: float  # first - median, at least 0

    def row(self) -> dict:
        return {"first_s": self.first, "median_s": self.median, "compile_s": self.compile}


def time_call(fn: Callable[[], Any], repeats: int = 3) -> tuple[Timing, Any]:
    """Time ``fn()`` (which must return JAX arrays) after a first, compiling call."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        runs.append(time.perf_counter() - start)
    median = statistics.median(runs)
    return Timing(first, median, max(first - median, 0.0)), out


class MLP(nn.Module):
    widths: tuple[int, ...]
    classes: int

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.tanh(nn.Dense(w)(x))
        return nn.Dense(self.classes)(x)


class Problem(NamedTuple):
    loss_fn: Callable
    model_fn: Callable
    output_loss: Callable
    params: Any
    train: Any
    test: Any
    num_params: int


def cross_entropy(logits, batch):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))


def mlp_problem(
    n_train: int,
    n_test: int,
    *,
    d_in: int = 32,
    widths=(64,),
    classes: int = 10,
    dtype=jnp.float32,
    seed: int = 0,
    train_steps: int = 200,
) -> Problem:
    """A tanh MLP classifier trained briefly (Adam, full batch) on a random teacher task."""
    key = jax.random.key(seed)
    kx, kt, ki = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n_train + n_test, d_in), jnp.float32).astype(dtype)
    teacher = jax.random.normal(kt, (d_in, classes), jnp.float32).astype(dtype)
    y = jnp.argmax(x @ teacher + 0.5 * jax.random.normal(ki, (n_train + n_test, classes)), axis=-1)
    module = MLP(tuple(widths), classes)
    params = jax.tree.map(lambda a: a.astype(dtype), module.init(jax.random.key(seed + 1), x[:1]))

    def model_fn(p, batch):
        return module.apply(p, batch[0])

    def loss_fn(p, batch):
        return cross_entropy(model_fn(p, batch), batch)

    train, test = (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
    opt = optax.adam(1e-2)

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss_fn)(p, train)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, opt.init(p)), None, length=train_steps)[0][0]

    params = fit(params)
    num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    return Problem(loss_fn, model_fn, cross_entropy, params, train, test, num_params)


def gradient_floor(problem: Problem, repeats: int = 3) -> Timing:
    """One jitted pass of per-example gradients over the test and the train data: the floor of any
    exact-gradient influence method."""
    grads = jax.jit(lambda p, b: per_example_grads(problem.loss_fn, p, b))
    timing, _ = time_call(lambda: (grads(problem.params, problem.test), grads(problem.params, problem.train)), repeats)
    return timing


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.devices()[0].platform})"
    )


def write_results(name: str, rows: list[dict], columns: list[str], meta: dict | None = None) -> str:
    """Write ``<name>.json`` and ``<name>.md`` under ``results_dir()``; return the markdown table.

    A ``--quick`` run marks both files (``"quick": true``, a first line in the markdown) as not representative.
    """
    folder = results_dir()
    os.makedirs(folder, exist_ok=True)
    payload = {"machine": machine(), "quick": cli.QUICK, "meta": meta or {}, "rows": rows}
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2, default=float)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    table = "\n".join(lines)
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write((cli.BANNER + "\n\n" if cli.QUICK else "") + table + "\n")
    return table


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def spearman(a, b) -> float:
    """Spearman rank correlation of two arrays of the same size (ties broken by order)."""
    ra = np.argsort(np.argsort(np.ravel(a)))
    rb = np.argsort(np.argsort(np.ravel(b)))
    return float(np.corrcoef(ra, rb)[0, 1])


def split(data, batch_size: int) -> list:
    """``data`` cut into batches of ``batch_size`` along the leading axis (the last may be smaller)."""
    n = jax.tree.leaves(data)[0].shape[0]
    return [jax.tree.map(lambda a, i=i: a[i : i + batch_size], data) for i in range(0, n, batch_size)]


def influence_model(problem: Problem, solver, *, damping: float, curvature: str, params=None):
    """A non-strict :class:`jaxinf.InfluenceModel` of ``problem`` (benchmarks record convergence themselves)."""
    import jaxinf

    return jaxinf.InfluenceModel(
        problem.loss_fn,
        problem.params if params is None else params,
        solver,
        damping=damping,
        curvature=curvature,
        model_fn=problem.model_fn,
        output_loss=problem.output_loss,
        strict=False,
    )

