"""Two fits that issue 15 found slow: ``direct()`` at P ≈ 2,400 and ``arnoldi(100)`` on a ≈5,100-parameter CNN.

    python benchmarks/bench_slow_paths.py direct [--factorization auto eigh cholesky]
    python benchmarks/bench_slow_paths.py arnoldi [--rank 100] [--n-train 1000] [--model]

``direct``: an MLP on 8×8 digits-like inputs with P = 2,410 (64 → 32 → 10
plus biases, as the issue's digits MLP), Gauss-Newton curvature, damping
1e-3; it times ``solver.init`` (dense curvature + factorisation) per
``factorization`` option, and the factorisation alone on the same dense matrix
(``eigh`` against ``cholesky``), after a compiling call, median of
``--repeats``.

``arnoldi``: a Flax Linen CNN (conv 3×3, 30 channels → relu → 2×2 average
pool → dense 10 on 8×8×1 inputs: P = 5,110) with the Hessian curvature, as the
issue's. It times one compiled Hessian-vector product over the training set
and ``arnoldi(rank).init`` (``krylov_dim = 2·rank + 10`` products), so the
fit's time can be compared with its product count.

Options ``--model`` (time ``InfluenceModel.fit`` and ``influences`` too),
``--pool max``, ``--dtype float32`` and ``--batch-size`` try the variants a
user might run. Wall seconds of the first (compiling) call and the median of
the warm ones; ``cpu_s``: CPU seconds of all threads of the last warm call.
Prints a table and writes JSON to ``benchmarks/results/slow_paths_<what>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import _cli as cli  # benchmarks/ is on sys.path when this script runs
import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

jax.config.update("jax_enable_x64", True)

import jaxinf  # noqa: E402
from jaxinf.solvers.direct import dense_curvature  # noqa: E402


class MLP(nn.Module):
    hidden: int = 32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.tanh(nn.Dense(self.hidden)(x)))


class CNN(nn.Module):
    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(30, (3, 3), padding="SAME")(x))
        x = (nn.avg_pool if self.pool == "avg" else nn.max_pool)(x, (2, 2), strides=(2, 2))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def problem(module, shape, n_train, seed=0, dtype=jnp.float64):
    kx, kt, ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n_train, *shape), dtype)
    teacher = module.init(kt, x[:1])
    y = jnp.argmax(3.0 * module.apply(teacher, x), axis=-1)
    params = jax.tree.map(lambda a: a.astype(dtype), module.init(ks, x[:1]))

    def model_fn(p, batch):
        return module.apply(p, batch[0])

    def output_loss(logits, batch):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))

    def loss_fn(p, batch):
        return output_loss(model_fn(p, batch), batch)

    return params, (x, y), model_fn, output_loss, loss_fn


CPU = {}  # what -> CPU seconds (all threads) of the last timed call


def timed(fn, repeats, what=None):
    """``(first, median)`` wall seconds; the CPU seconds of the last call go to ``CPU[what]``."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - start)
        CPU[what] = time.process_time() - cpu
    return first, statistics.median(runs) if runs else first


def bench_direct(args) -> dict:
    params, train, model_fn, output_loss, loss_fn = problem(MLP(args.hidden), (64,), args.n_train)
    op = jaxinf.curvature_operator(
        None, params, train, kind="gauss_newton", model_fn=model_fn, output_loss=output_loss, damping=1e-3
    )
    rows = []
    dense = jax.block_until_ready(jax.jit(dense_curvature)(op))
    damped = dense + 1e-3 * jnp.eye(op.size)
    for name, fn in [("eigh alone", jax.jit(jnp.linalg.eigh)), ("cholesky alone", jax.jit(jnp.linalg.cholesky))]:
        first, median = timed(lambda fn=fn: fn(damped), args.repeats, name)
        rows.append({"what": name, "first_s": first, "median_s": median, "cpu_s": CPU.get(name)})
    for fact in args.factorization:
        solver = jaxinf.direct(factorization=fact)
        init = jax.jit(solver.init)
        first, median = timed(lambda init=init: init(op), args.repeats, fact)
        state = init(op)
        rows.append({"what": f"direct(factorization={fact!r}).init", "first_s": first, "median_s": median,
                     "cpu_s": CPU.get(fact), "ran": state.factorizations})
    return {"P": op.size, "N": args.n_train, "dtype": "float64", "curvature": "gauss_newton", "rows": rows}


def bench_arnoldi(args) -> dict:
    dtype = jnp.dtype(args.dtype)
    params, train, _, _, loss_fn = problem(CNN(args.pool), (8, 8, 1), args.n_train, dtype=dtype)
    full = train
    if args.batch_size:
        train = [jax.tree.map(lambda a, i=i: a[i : i + args.batch_size], train)
                 for i in range(0, args.n_train, args.batch_size)]
    op = jaxinf.curvature_operator(loss_fn, params, train, kind="hessian", damping=1e-3)
    v = jax.tree.map(jnp.ones_like, params)
    hvp = jax.jit(lambda o, v: o.curvature_vp(v))
    hvp_first, hvp_median = timed(lambda: hvp(op, v), args.repeats, "hvp")
    solver = jaxinf.arnoldi(args.rank)
    m = min(op.size, 2 * args.rank + 10)
    init = jax.jit(lambda o, k: solver.init(o, key=k))
    first, median = timed(lambda: init(op, jax.random.key(0)), min(args.repeats, 1), "init")
    rows = [
        {"what": "one Hessian-vector product", "first_s": hvp_first, "median_s": hvp_median,
         "cpu_s": CPU.get("hvp")},
        {"what": f"arnoldi({args.rank}).init, {m} products", "first_s": first, "median_s": median,
         "cpu_s": CPU.get("init"), "products_x_hvp_s": m * hvp_median},
    ]
    if args.model:
        rows += model_rows(args, params, full, loss_fn)
    return {"P": op.size, "N": args.n_train, "dtype": args.dtype, "pool": args.pool, "batch_size": args.batch_size,
            "curvature": "hessian", "rows": rows}


def model_rows(args, params, train, loss_fn) -> list:
    """The same fit through ``InfluenceModel`` (fit, then influences of ``--n-test`` points on the training set)."""
    x, y = train
    test = (x[: args.n_test] + 0.1, y[: args.n_test])
    rows = []
    model = jaxinf.InfluenceModel(loss_fn, params, jaxinf.arnoldi(args.rank), damping=1e-3)
    start = time.perf_counter()
    model.fit(train)
    rows.append({"what": "InfluenceModel.fit (first call)", "first_s": time.perf_counter() - start, "median_s": 0.0})
    start = time.perf_counter()
    jax.block_until_ready(model.influences(test, train))
    rows.append({"what": f"influences({args.n_test} x {args.n_train}) (first)",
                 "first_s": time.perf_counter() - start, "median_s": 0.0})
    return rows


QUICK = dict(n_train=64, rank=5, repeats=1, n_test=3, hidden=4)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    add = parser.add_argument
    add("what", choices=["direct", "arnoldi"], help="which fit to time")
    add("--factorization", nargs="+", default=["eigh", "auto"], choices=["auto", "cholesky", "eigh"],
        help="direct: the factorization options to time")
    add("--hidden", type=int, default=32, help="direct: hidden width of the MLP (32: P = 2,410)")
    add("--rank", type=int, default=100, help="arnoldi: rank r (krylov_dim = 2r + 10 products)")
    add("--n-train", type=int, default=1000, help="training points")
    add("--repeats", type=int, default=3, help="timed calls after the compiling first one (the median is reported)")
    add("--model", action="store_true", help="arnoldi: also time InfluenceModel.fit and influences")
    add("--n-test", type=int, default=10, help="arnoldi --model: test points scored")
    add("--pool", choices=["avg", "max"], default="avg", help="arnoldi: the CNN's pooling")
    add("--dtype", choices=["float64", "float32"], default="float64", help="arnoldi: dtype of params and data")
    add("--batch-size", type=int, default=None, help="arnoldi: give the training data as a list of batches")
    cli.add_quick(parser, "N=64, an MLP of width 4 (P = 310), rank 5, one repeat")
    return parser


def main(argv=None):
    args = cli.parse(build_parser(), argv, QUICK)
    result = bench_direct(args) if args.what == "direct" else bench_arnoldi(args)
    result.update(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__)
    print(f"{args.what}: P={result['P']} N={result['N']} {result['dtype']} {result['curvature']}")
    for row in result["rows"]:
        extra = "  ".join(f"{k}={v}" for k, v in row.items() if k not in ("what", "first_s", "median_s"))
        print(f"  {row['what']:<48} first {row['first_s']:8.2f} s   warm {row['median_s']:8.2f} s  {extra}")
    os.makedirs(common.results_dir(), exist_ok=True)
    with open(os.path.join(common.results_dir(), f"slow_paths_{args.what}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
