"""Time fit and influences of one solver against the per-example-gradient floor.

    python benchmarks/bench_influence.py --solver direct --n-train 2000 --n-test 100

Prints a table and writes ``benchmarks/results/influence_<solver>.json`` and
``.md`` (``--quick``: a smoke test, under ``benchmarks/results/quick/``).
Compile time is reported apart (first call minus the median of the following
calls). The floor is one jitted pass of per-example gradients over
the same test and training data; ``x floor`` columns are ratios measured in the
same run. When the solver is not ``direct`` and the model is small enough, the
influence matrix is compared with ``direct``'s (relative error, Pearson and
Spearman correlation).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import _cli as cli  # noqa: E402
import common  # noqa: E402

import jaxinf  # noqa: E402


def make_solver(name: str, options: dict) -> jaxinf.Solver:
    factory = getattr(jaxinf, name, None)
    if factory is None:
        raise SystemExit(f"unknown solver {name!r}; jaxinf exports: {', '.join(jaxinf.__all__)}")
    return factory(**options)


def run(args) -> dict:
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    problem = common.mlp_problem(
        args.n_train, args.n_test, d_in=args.d_in, widths=tuple(args.widths), dtype=dtype, seed=args.seed
    )
    batches = common.split(problem.train, args.batch_size)
    floor = common.gradient_floor(problem, args.repeats)

    def build(solver):
        return common.influence_model(problem, solver, damping=args.damping, curvature=args.curvature)

    model = build(make_solver(args.solver, json.loads(args.options)))
    key = jax.random.key(args.seed)
    fit_t, _ = common.time_call(lambda: model.fit(batches, key=key).state, args.repeats)
    score_t, scores = common.time_call(lambda: model.influences(problem.test, batches), args.repeats)
    row = {
        "solver": args.solver,
        "options": args.options,
        "curvature": args.curvature,
        "P": problem.num_params,
        "N": args.n_train,
        "n_test": args.n_test,
        "dtype": args.dtype,
        "damping": args.damping,
        "fit_s": fit_t.median,
        "fit_compile_s": fit_t.compile,
        "influences_s": score_t.median,
        "influences_compile_s": score_t.compile,
        "floor_s": floor.median,
        "influences_x_floor": score_t.median / floor.median,
        "total_x_floor": (fit_t.median + score_t.median) / floor.median,
    }
    if args.solver != "direct" and problem.num_params <= args.max_direct_params:
        exact = build(jaxinf.direct()).fit(batches).influences(problem.test, batches)
        a, b = np.asarray(scores, np.float64), np.asarray(exact, np.float64)
        row.update(
            rel_error=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
            pearson=float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
            spearman=common.spearman(a, b),
        )
    return row


QUICK = dict(n_train=200, n_test=5, d_in=8, widths=[16], batch_size=100, repeats=1)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--solver", default="direct", help="jaxinf solver factory to time, e.g. direct, cg, arnoldi")
    parser.add_argument(
        "--options", default="{}", help="JSON keyword arguments of the factory, e.g. '{\"rank\": 50}'"
    )
    parser.add_argument(
        "--curvature", default="gauss_newton", choices=list(jaxinf.CURVATURES), help="curvature the solver inverts"
    )
    parser.add_argument("--damping", type=float, default=1e-3, help="damping λ of (C + λI)⁻¹")
    parser.add_argument("--n-train", type=int, default=2000, help="training points (columns of the influence matrix)")
    parser.add_argument("--n-test", type=int, default=100, help="test points (rows of the influence matrix)")
    parser.add_argument("--d-in", type=int, default=32, help="input features of the MLP")
    parser.add_argument("--widths", type=int, nargs="+", default=[64], help="hidden-layer widths of the tanh MLP")
    parser.add_argument("--batch-size", type=int, default=500, help="training points per batch")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float64"], help="dtype of model, data and solver"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls after the compiling first one (the median is reported)"
    )
    parser.add_argument(
        "--max-direct-params",
        type=int,
        default=6000,
        help="compare a non-direct solver with direct only up to this many parameters (direct costs O(P³))",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of data, model and solver")
    cli.add_quick(parser, "N=200, 5 test points, an 8-16-10 MLP, one repeat")
    return parser


def main(argv=None):
    args = cli.parse(build_parser(), argv, QUICK)
    row = run(args)
    columns = [
        "solver",
        "curvature",
        "P",
        "N",
        "n_test",
        "dtype",
        "fit_s",
        "fit_compile_s",
        "influences_s",
        "influences_compile_s",
        "floor_s",
        "influences_x_floor",
        "total_x_floor",
        "rel_error",
        "pearson",
        "spearman",
    ]
    table = common.write_results(f"influence_{args.solver}", [row], columns, {"command": " ".join(sys.argv)})
    print(f"machine: {common.machine()}")
    print(table)
    return row


if __name__ == "__main__":
    main()
