"""Iterative solvers on an MLP: iterations, products and time to reach rtol, and accuracy.

    python benchmarks/bench_iterative.py                       # P ≈ 1.1e4, N = 1000, 8 right-hand sides
    python benchmarks/bench_iterative.py --widths 64 --damping 1e-4   # P ≈ 2.8e3: direct is the reference

Methods: plain CG (``vmap`` over right-hand sides), block CG (``solve_many``),
Jacobi- and Nyström-pre-conditioned CG, and LiSSA, all on the damped
Gauss-Newton curvature of a briefly trained tanh MLP classifier. The right-hand
sides are gradients of test points. For each method the table gives: the fit
time (``init``; compile apart) and the full-data curvature-vector products it
spent; the solve time for all right-hand sides (median after a compiling first
call); iterations per right-hand side (max); the products spent by the solve;
whether every right-hand side converged; and the relative error of the
solutions against a reference: ``direct`` when ``P <= --max-direct-params``,
else pre-conditioned CG at ``rtol=1e-11``. LiSSA's products are counted in
full-data equivalents (``steps · batch_size / N``, plus its final residual).

The cost of one curvature-vector product is measured as a multiple of one
gradient of the mean loss over the same data (both jitted, median time).

Writes ``benchmarks/results/iterative<tag>.json`` and ``.md`` (``--quick``: a
smoke test at toy sizes, under ``benchmarks/results/quick/``).
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
from jaxinf.core.data import weighted_mean  # noqa: E402
from jaxinf.core.tree import ravel, unravel  # noqa: E402


def largest_eigenvalue(op, iterations: int = 30) -> float:
    """Power iteration on ``C + Λ`` (an estimate from below of the top eigenvalue)."""
    step = jax.jit(lambda o, x: ravel(o.matvec(unravel(o.spec, x)), o.dtype))
    x = jax.random.normal(jax.random.key(0), (op.size,), op.dtype)
    lam = 0.0
    for _ in range(iterations):
        y = step(op, x)
        lam = float(jnp.linalg.norm(y))
        x = y / lam
    return lam


def product_cost(op, repeats: int) -> dict:
    """Median time of one curvature-vector product and of one gradient of the mean loss, same data."""
    v = jax.tree.map(jnp.ones_like, op.params)
    matvec = jax.jit(lambda o, u: o.matvec(u))
    grad = jax.jit(lambda o: weighted_mean(lambda b: jax.grad(o.loss_fn)(o.params, b), o.data))
    t_mv, _ = common.time_call(lambda: matvec(op, v), repeats)
    t_g, _ = common.time_call(lambda: grad(op), repeats)
    return {"product_s": t_mv.median, "gradient_s": t_g.median, "product_x_gradient": t_mv.median / t_g.median}


def methods(args, scale: float, n: int) -> list[tuple[str, jaxinf.Solver, str, float]]:
    """(label, solver, how to solve, products spent by init)."""
    kw = dict(rtol=args.rtol, maxiter=args.maxiter)
    out = [
        ("cg", jaxinf.cg(**kw), "vmap", 0.0),
        ("block_cg", jaxinf.cg(block=True, block_size=args.block_size, **kw), "many", 0.0),
        ("cg+jacobi", jaxinf.cg(preconditioner=jaxinf.jacobi_preconditioner(args.jacobi_samples), **kw), "vmap",
         float(args.jacobi_samples)),
    ]
    for r in args.ranks:
        out.append((f"cg+nystrom({r})", jaxinf.cg(preconditioner=jaxinf.nystrom_preconditioner(r), **kw), "vmap",
                    float(r)))
    r = args.ranks[-1]
    out.append((f"block_cg+nystrom({r})", jaxinf.cg(block=True, block_size=args.block_size,
                                                    preconditioner=jaxinf.nystrom_preconditioner(r), **kw),
                "many", float(r)))
    out.append((f"lissa(s={scale:.3g})", jaxinf.lissa(scale=scale, maxiter=args.lissa_steps, rtol=args.rtol,
                                                    batch_size=args.lissa_batch), "vmap", 0.0))
    return out


def solve_products(label: str, info, how: str, k: int, n: int, args) -> float:
    """Full-data curvature-vector products spent by one solve of all right-hand sides."""
    its = np.asarray(info.iterations)
    if label.startswith("lissa"):
        return float(its.sum()) * min(args.lissa_batch, n) / n + len(its)
    if how == "many":  # every iteration multiplies the whole block; one more product for the true residual
        chunks = [its[i : i + k] for i in range(0, len(its), k)]
        return float(sum((c.max() + 1) * k for c in chunks))
    return float((its + 1).sum())


def run(args) -> tuple[list[dict], dict]:
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    problem = common.mlp_problem(args.n_train, args.n_test, d_in=args.d_in, widths=tuple(args.widths),
                                 dtype=dtype, seed=args.seed)
    batches = [jax.tree.map(lambda a, i=i: a[i : i + args.batch_size], problem.train)
               for i in range(0, args.n_train, args.batch_size)]
    op = jaxinf.curvature_operator(problem.loss_fn, problem.params, batches, kind="gauss_newton",
                                   model_fn=problem.model_fn, output_loss=problem.output_loss, damping=args.damping)
    rhs = jax.jit(jax.vmap(jax.grad(problem.loss_fn), in_axes=(None, 0)))(
        problem.params, jax.tree.map(lambda a: a[:, None], problem.test))
    top = largest_eigenvalue(op)
    meta = {"P": op.size, "N": args.n_train, "n_rhs": args.n_test, "dtype": args.dtype, "damping": args.damping,
            "rtol": args.rtol, "largest_eigenvalue": top, "condition_estimate": top / args.damping,
            **product_cost(op, args.repeats)}
    print(f"machine: {common.machine()}")
    print(f"P = {op.size}, N = {args.n_train}, {args.n_test} right-hand sides, {args.dtype}, GN curvature, "
          f"damping {args.damping:g}, λ_max ≈ {top:.3g}, κ ≈ {top / args.damping:.3g}, rtol {args.rtol:g}")
    print(f"one curvature-vector product = {meta['product_x_gradient']:.2f} x one gradient "
          f"({meta['product_s'] * 1e3:.2f} ms vs {meta['gradient_s'] * 1e3:.2f} ms)")

    if op.size <= args.max_direct_params:
        ref_solver, ref_name = jaxinf.direct(), "direct"
    else:
        ref_solver = jaxinf.cg(rtol=1e-11, maxiter=20 * args.maxiter,
                               preconditioner=jaxinf.nystrom_preconditioner(max(args.ranks)))
        ref_name = f"cg(rtol=1e-11)+nystrom({max(args.ranks)})"
    start = time.perf_counter()
    ref_state = jax.jit(ref_solver.init)(op)
    ref, ref_info = jax.block_until_ready(jax.jit(jax.vmap(ref_solver.solve, in_axes=(None, 0)))(ref_state, rhs))
    ref_seconds = time.perf_counter() - start
    ref = np.asarray(jax.vmap(ravel)(ref), np.float64)
    meta["reference"] = ref_name
    meta["reference_converged"] = bool(np.all(np.asarray(ref_info.converged)))
    print(f"reference: {ref_name} ({ref_seconds:.2f} s incl. compile)")

    rows = []
    k = min(args.block_size, op.size, args.n_test)
    for label, solver, how, init_products in methods(args, 2.0 * top, args.n_train):
        key = jax.random.key(args.seed)
        init = jax.jit(lambda o, solver=solver, key=key: solver.init(o, key=key))
        fit_t, state = common.time_call(lambda init=init: init(op), args.repeats)
        solve = jax.jit(solver.solve_many if how == "many" else jax.vmap(solver.solve, in_axes=(None, 0)))
        solve_t, (x, info) = common.time_call(lambda solve=solve, state=state: solve(state, rhs), args.repeats)
        got = np.asarray(jax.vmap(ravel)(x), np.float64)
        err = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
        rows.append({
            "method": label,
            "fit_s": fit_t.median,
            "fit_compile_s": fit_t.compile,
            "fit_products": init_products,
            "solve_s": solve_t.median,
            "solve_compile_s": solve_t.compile,
            "iterations_max": int(np.max(info.iterations)),
            "products": solve_products(label, info, how, k, args.n_train, args),
            "converged": f"{int(np.sum(info.converged))}/{args.n_test}",
            "diverged": int(np.sum(info.diverged)),
            "rel_error_max": float(np.max(err)),
        })
        print(f"  {label:<24} its {rows[-1]['iterations_max']:>6}  solve {solve_t.median:8.3f} s  "
              f"err {rows[-1]['rel_error_max']:.2e}  converged {rows[-1]['converged']}", flush=True)
    base = rows[0]["solve_s"]
    for r in rows:
        r["solve_x_cg"] = r["solve_s"] / base
    return rows, meta


QUICK = dict(
    n_train=200, n_test=4, d_in=8, widths=[16], batch_size=100, damping=1e-3, maxiter=300, block_size=4,
    ranks=[10], jacobi_samples=10, lissa_steps=50, lissa_batch=50, repeats=1,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    add = parser.add_argument
    add("--n-train", type=int, default=1000, help="training points the curvature averages over")
    add("--n-test", type=int, default=8, help="right-hand sides (gradients of that many test points)")
    add("--d-in", type=int, default=32, help="input features of the MLP")
    add("--widths", type=int, nargs="+", default=[256], help="hidden-layer widths of the tanh MLP")
    add("--batch-size", type=int, default=500, help="training points per batch of the curvature operator")
    add("--damping", type=float, default=1e-5, help="damping λ of C + λI (smaller: worse conditioned)")
    add("--rtol", type=float, default=1e-6, help="relative residual tolerance of every iterative method")
    add("--maxiter", type=int, default=2000, help="iteration cap of the CG variants, per right-hand side")
    add("--block-size", type=int, default=8, help="right-hand sides per block of block CG")
    add("--ranks", type=int, nargs="+", default=[100], help="ranks of the Nyström pre-conditioner (one row each)")
    add("--jacobi-samples", type=int, default=50, help="Hutchinson probes of the Jacobi (diagonal) pre-conditioner")
    add("--lissa-steps", type=int, default=1000, help="LiSSA iteration cap (minibatch steps) per right-hand side")
    add("--lissa-batch", type=int, default=100, help="training points per LiSSA minibatch")
    add("--dtype", default="float64", choices=["float32", "float64"], help="dtype of model, data and solvers")
    add("--repeats", type=int, default=3, help="timed calls after the compiling first one (the median is reported)")
    add(
        "--max-direct-params",
        type=int,
        default=4000,
        help="reference is direct up to this many parameters, else pre-conditioned CG at rtol 1e-11",
    )
    add("--seed", type=int, default=0, help="random seed of data, model and solvers")
    add("--tag", default="", help="suffix of the result files: results/iterative<tag>.json and .md")
    cli.add_quick(parser, "N=200, 4 right-hand sides, an 8-16-10 MLP, λ=1e-3, Nyström rank 10, 50 LiSSA steps")
    return parser


def main(argv=None):
    args = cli.parse(build_parser(), argv, QUICK)
    rows, meta = run(args)
    columns = ["method", "fit_s", "fit_compile_s", "fit_products", "solve_s", "solve_compile_s", "solve_x_cg",
               "iterations_max", "products", "converged", "diverged", "rel_error_max"]
    meta["command"] = " ".join(sys.argv)
    table = common.write_results(f"iterative{args.tag}", rows, columns, meta)
    print(table)
    return rows, meta


if __name__ == "__main__":
    main()
