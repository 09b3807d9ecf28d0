"""Low-rank solvers (Arnoldi, Nyström) against rank: fit cost, scoring time, accuracy.

    python benchmarks/bench_lowrank.py            # defaults: P ≈ 1.7e4, N = 1000, 20 test points
    python benchmarks/bench_lowrank.py --ranks 20 80 --n-train 2000 --dtype float32

For each method and rank it reports: the fit time (compile apart) and the
number of curvature-vector products it spent; the time of ``influences(test,
train)`` by projected scoring (``r`` JVPs per batch, plus per-example
gradients of the test batch when the completion is on), as a ratio to the
per-example-gradient floor (one jitted pass of per-example gradients over the
test and training data) and to the "solve the test factors, contract with
training gradients" path of the same fitted state; and the accuracy of the
influence matrix against a reference (``direct`` when ``P`` is small enough,
else CG to a tight tolerance): relative error, Pearson and Spearman.

Writes ``benchmarks/results/lowrank.json`` and ``.md`` (``--quick``: a smoke
test at toy sizes, under ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import _cli as cli  # noqa: E402
import common  # noqa: E402

import jaxinf  # noqa: E402

METHODS = {
    "arnoldi": lambda r: jaxinf.arnoldi(r, completion=False),
    "arnoldi+completion": lambda r: jaxinf.arnoldi(r, completion=True),
    "nystrom": lambda r: jaxinf.nystrom(r),
    "nystrom-projection": lambda r: jaxinf.nystrom(r, completion=False),
}


def run(args) -> tuple[list[dict], dict]:
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    problem = common.mlp_problem(
        args.n_train, args.n_test, d_in=args.d_in, widths=tuple(args.widths), dtype=dtype, seed=args.seed
    )
    batches = common.split(problem.train, args.batch_size)
    floor = common.gradient_floor(problem, args.repeats)
    print(
        f"P = {problem.num_params}, N = {args.n_train}, n_test = {args.n_test}, {args.dtype}, "
        f"curvature = {args.curvature}, damping = {args.damping}; per-example-gradient floor "
        f"{floor.median * 1e3:.1f} ms",
        flush=True,
    )

    def build(solver):
        return common.influence_model(problem, solver, damping=args.damping, curvature=args.curvature)

    key = jax.random.key(args.seed)
    if problem.num_params <= args.max_direct_params:
        ref_name, ref_solver = "direct", jaxinf.direct()
    else:
        rtol = 1e-9 if args.dtype == "float64" else 1e-5
        ref_name, ref_solver = f"cg(rtol={rtol:g})", jaxinf.cg(rtol=rtol, maxiter=args.cg_maxiter)
    reference = build(ref_solver).fit(batches, key=key)
    start = time.perf_counter()
    exact = np.asarray(jax.block_until_ready(reference.influences(problem.test, batches)), np.float64)
    ref_s = time.perf_counter() - start
    print(f"reference {ref_name}: {ref_s:.1f} s", flush=True)

    rows = []
    for rank in args.ranks:
        for name in args.methods:
            model = build(METHODS[name](rank))
            fit_t, state = common.time_call(lambda m=model: m.fit(batches, key=key).state, args.repeats)
            score_t, scores = common.time_call(lambda m=model: m.influences(problem.test, batches), args.repeats)
            factors_t, _ = common.time_call(
                lambda m=model: m.influences_from_factors(m.influence_factors(problem.test), batches), args.repeats
            )
            got = np.asarray(scores, np.float64)
            row = {
                "method": name,
                "rank": rank,
                "products": state.products,
                "fit_s": fit_t.median,
                "fit_compile_s": fit_t.compile,
                "score_s": score_t.median,
                "score_compile_s": score_t.compile,
                "score_x_floor": score_t.median / floor.median,
                "factors_path_s": factors_t.median,
                "score_x_factors_path": score_t.median / factors_t.median,
                "rel_error": float(np.linalg.norm(got - exact) / np.linalg.norm(exact)),
                "pearson": float(np.corrcoef(got.ravel(), exact.ravel())[0, 1]),
                "spearman": common.spearman(got, exact),
            }
            rows.append(row)
            print(" ".join(f"{k}={common._fmt(v)}" for k, v in row.items()), flush=True)
    meta = {
        "P": problem.num_params,
        "N": args.n_train,
        "n_test": args.n_test,
        "dtype": args.dtype,
        "curvature": args.curvature,
        "damping": args.damping,
        "reference": ref_name,
        "reference_s": ref_s,
        "floor_s": floor.median,
        "command": " ".join(sys.argv),
    }
    return rows, meta


QUICK = dict(
    ranks=[5], methods=["arnoldi", "nystrom"], n_train=200, n_test=5, d_in=8, widths=[16, 8], batch_size=100, repeats=1
)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    add = parser.add_argument
    add("--ranks", type=int, nargs="+", default=[10, 40, 160], help="ranks r of the low-rank solvers (one row each)")
    add("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="low-rank variants to run")
    add("--curvature", default="gauss_newton", choices=list(jaxinf.CURVATURES), help="curvature the solvers invert")
    add("--damping", type=float, default=1e-2, help="damping λ of (C + λI)⁻¹")
    add("--n-train", type=int, default=1000, help="training points (columns of the influence matrix)")
    add("--n-test", type=int, default=20, help="test points (rows of the influence matrix)")
    add("--d-in", type=int, default=64, help="input features of the MLP")
    add("--widths", type=int, nargs="+", default=[128, 64], help="hidden-layer widths of the tanh MLP")
    add("--batch-size", type=int, default=500, help="training points per batch")
    add("--dtype", default="float64", choices=["float32", "float64"], help="dtype of model, data and solvers")
    add("--repeats", type=int, default=3, help="timed calls after the compiling first one (the median is reported)")
    add(
        "--max-direct-params",
        type=int,
        default=3000,
        help="reference is direct up to this many parameters, else CG to a tight tolerance",
    )
    add("--cg-maxiter", type=int, default=3000, help="iteration cap of the CG reference (large models only)")
    add("--seed", type=int, default=0, help="random seed of data, model and solvers")
    cli.add_quick(parser, "rank 5, arnoldi and nystrom only, N=200, 5 test points, an 8-16-8-10 MLP, one repeat")
    return parser


def main(argv=None):
    args = cli.parse(build_parser(), argv, QUICK)
    rows, meta = run(args)
    columns = [
        "method",
        "rank",
        "products",
        "fit_s",
        "fit_compile_s",
        "score_s",
        "score_x_floor",
        "score_x_factors_path",
        "rel_error",
        "pearson",
        "spearman",
    ]
    table = common.write_results("lowrank", rows, columns, meta)
    print(f"machine: {common.machine()}")
    print(
        f"P = {meta['P']}, N = {meta['N']}, n_test = {meta['n_test']}, {meta['dtype']}, {meta['curvature']}, "
        f"damping = {meta['damping']}; reference: {meta['reference']} ({meta['reference_s']:.1f} s); "
        f"per-example-gradient floor {meta['floor_s'] * 1e3:.1f} ms"
    )
    print(table)
    return rows


if __name__ == "__main__":
    main()
