"""Every jaxinf solver on the same model, data and damping, against the exact answer.

    python benchmarks/suite.py                      # defaults: P = 1386, N = 1000, 50 test points, float32
    python benchmarks/suite.py --methods cg arnoldi --repeats 1
    python benchmarks/suite.py --list               # the configurations it would run

The solvers are discovered: every factory exported by ``jaxinf`` whose return
annotation is ``Solver`` is run, with the configurations in ``CONFIGS`` (a
sweep of its accuracy knob: tolerance, rank, iterations) or, for a factory the
suite does not know yet, with its defaults. A solver added to ``jaxinf`` is
therefore benchmarked without editing this file.

For each configuration, on a tanh MLP classifier trained on a random teacher
task (``common.mlp_problem``), it reports

* ``ihvp_rel_err``: ``‖F − F*‖ / ‖F*‖`` for the influence factors
  ``F = (C + λI)⁻¹ ∇θℓ(test)`` of all test points;
* ``infl_rel_err``, ``pearson``, ``spearman``: the influence matrix
  ``influences(test, train)`` against the exact one; ``top10``, ``top100``,
  ``harmful_top10``: the mean share of each test point's 10 / 100 most helpful
  (10 most harmful) training points that the method also ranks there (k capped
  at N);
* ``fit_s``, ``solve_s`` (the factors of all test points from precomputed
  gradients), ``influences_s`` (the whole ``n_test × n_train`` matrix from a
  fitted model, including its solves): medians after a compiling first call,
  whose extra time is reported as ``*_compile_s``;
* ``total_x_floor``: ``(fit_s + influences_s) / floor_s``, the floor being one
  jitted pass of per-example gradients over the test and train data, timed in
  the same run;
* ``products``: curvature-vector products over the full data spent by the fit
  and by the solves of all test points (a minibatch product counts as its
  fraction of the data; K-FAC/EK-FAC spend data passes, not products);
* ``converged``: right-hand sides whose ``SolveInfo`` says converged.

The exact reference is ``direct()`` in float64 on the same (float32-trained)
weights and data, upcast. Writes ``benchmarks/results/suite.json``,
``suite.md`` and ``suite.png`` (accuracy against time per method); ``--quick``:
a smoke test at toy sizes with three methods, under ``benchmarks/results/quick/``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli as cli  # noqa: E402
import common  # noqa: E402
from _metrics import topk_overlap  # noqa: E402
from common import spearman, split  # noqa: E402,F401  (also used as suite.spearman / suite.split)

import jaxinf  # noqa: E402
from jaxinf import ConvergenceError
from jaxinf.scoring import per_example_grads  # noqa: E402
from jaxinf.solvers.base import solve_many  # noqa: E402


class Config(NamedTuple):
    """One solver configuration of the suite."""

    family: str  # a line in the plot
    label: str  # a row in the table
    make: Callable[[dict], jaxinf.Solver]  # ctx -> solver
    fit_products: Callable[[dict], float] = lambda ctx: 0.0  # curvature-vector products spent by init
    curvature: str | None = None  # the curvature this method needs (None: the suite's --curvature)
    damping: float | None = None  # the damping this method needs (None: the suite's --damping)
    scores_only: bool = False  # a baseline that scores through a Scorer and gives no influence factors


def _rank(r: int, ctx: dict) -> int:
    return int(min(r, ctx["P"]))


def _tight(ctx: dict) -> float:
    """The tightest CG tolerance worth asking for in the methods' dtype."""
    return 1e-8 if ctx.get("dtype") == "float64" else 1e-5


# The accuracy knob of each factory. ctx: P, N, dtype, lam_max (largest curvature eigenvalue), damping.
CONFIGS: dict[str, Callable[[dict], list[Config]]] = {
    "direct": lambda ctx: [Config("direct", "direct", lambda c: jaxinf.direct(), lambda c: c["P"])],
    "cg": lambda ctx: [
        *[Config("cg", f"cg rtol={t:g}", lambda c, t=t: jaxinf.cg(rtol=t)) for t in (1e-2, 1e-4, _tight(ctx))],
        Config(
            "cg+jacobi",
            f"cg+jacobi(100) rtol={_tight(ctx):g}",
            lambda c: jaxinf.cg(rtol=_tight(c), preconditioner=jaxinf.jacobi_preconditioner(100)),
            lambda c: 100,
        ),
        *[
            Config(
                "cg+nystrom",
                f"cg+nystrom({_rank(50, ctx)}) rtol={t:g}",
                lambda c, t=t: jaxinf.cg(rtol=t, preconditioner=jaxinf.nystrom_preconditioner(_rank(50, c))),
                lambda c: _rank(50, c),
            )
            for t in (1e-4, _tight(ctx))
        ],
        Config("block_cg", f"block_cg rtol={_tight(ctx):g}", lambda c: jaxinf.cg(rtol=_tight(c), block=True)),
    ],
    "lissa": lambda ctx: [
        Config(
            "lissa",
            f"lissa T={t} bs=64",
            lambda c, t=t: jaxinf.lissa(maxiter=t, scale=float(5 * (c["lam_max"] + c["damping"])), batch_size=64),
        )
        for t in (100, 1000)
    ]
    + [Config("lissa", "lissa() defaults", lambda c: jaxinf.lissa(), lambda c: 160 * min(1.0, 64 / c["N"]))],
    "arnoldi": lambda ctx: [
        Config(
            "arnoldi",
            f"arnoldi r={_rank(r, ctx)}",
            lambda c, r=r: jaxinf.arnoldi(_rank(r, c)),
            lambda c, r=r: min(c["P"], 2 * _rank(r, c) + 10),
        )
        for r in (10, 40, 160)
    ],
    "nystrom": lambda ctx: [
        Config(
            "nystrom",
            f"nystrom r={_rank(r, ctx)}",
            lambda c, r=r: jaxinf.nystrom(_rank(r, c)),
            lambda c, r=r: _rank(r, c),
        )
        for r in (10, 40, 160)
    ],
    # default (sampled Fisher, one draw per example) and the exact output-loss Hessian in the factors
    "kfac": lambda ctx: [
        Config("kfac", "kfac", lambda c: jaxinf.kfac()),
        Config("kfac", "kfac fisher=exact", lambda c: jaxinf.kfac(fisher="exact")),
    ],
    "ekfac": lambda ctx: [
        Config("ekfac", "ekfac", lambda c: jaxinf.ekfac()),
        Config("ekfac", "ekfac fisher=exact", lambda c: jaxinf.ekfac(fisher="exact")),
    ],
    # DataInf inverts the empirical Fisher (its closed form needs per-example gradients): compared with the
    # exact influence of the suite's curvature, as a user choosing between them would
    "datainf": lambda ctx: [Config("datainf", "datainf (fisher)", lambda c: jaxinf.datainf(), curvature="fisher")],
    # the cheap attributions, no curvature at all (damping 0), on the same axes
    "gradient_dot": lambda ctx: [
        Config("baseline", "gradient_dot", lambda c: jaxinf.gradient_dot(), damping=0.0, scores_only=True)
    ],
    "gradient_cosine": lambda ctx: [
        Config("baseline", "gradient_cosine", lambda c: jaxinf.gradient_cosine(), damping=0.0, scores_only=True)
    ],
    "tracin": lambda ctx: [
        Config(
            "baseline",
            "tracin (final checkpoint)",
            lambda c: jaxinf.tracin([c["params"]]),
            damping=0.0,
            scores_only=True,
        )
    ],
}


def discover() -> dict[str, Callable]:
    """Solver factories exported by ``jaxinf``: functions annotated to return ``Solver``."""
    found = {}
    for name in getattr(jaxinf, "__all__", []):
        obj = getattr(jaxinf, name, None)
        if not inspect.isfunction(obj):
            continue
        ann = inspect.signature(obj).return_annotation
        if ann is jaxinf.Solver or ann == "Solver":
            found[name] = obj
    return found


def configurations(ctx: dict, only: list[str] | None = None) -> tuple[list[Config], list[str]]:
    """The suite's configurations for every discovered factory (``only``: names or families to keep)."""
    configs, notes = [], []
    for name, factory in discover().items():
        if name in CONFIGS:
            found = CONFIGS[name](ctx)
        else:
            try:
                factory()
            except TypeError as e:
                notes.append(f"{name}: skipped, its factory needs arguments ({e}); add it to CONFIGS")
                continue
            found = [Config(name, f"{name}()", lambda c, f=factory: f())]
            notes.append(f"{name}: not in CONFIGS, run with its defaults")
        configs.extend(found)
    configs = list({c.label: c for c in configs}.values())  # ranks capped at P can coincide
    if only:

        def matches(c: Config, name: str) -> bool:
            return name in (c.family, c.label, c.family.split("+")[0])

        notes += [f"{name}: matches no configuration" for name in only if not any(matches(c, name) for c in configs)]
        configs = [c for c in configs if any(matches(c, name) for name in only)]
    return configs, notes



def compare(got, exact) -> dict:
    a, b = np.asarray(got, np.float64), np.asarray(exact, np.float64)
    return {
        "infl_rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "pearson": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
        "spearman": spearman(a, b),
        # what users act on: the most helpful and most harmful training points of each test point
        "top10": topk_overlap(a, b, 10),
        "top100": topk_overlap(a, b, 100),
        "harmful_top10": topk_overlap(a, b, 10, largest=False),
    }


def _ravel_rows(tree) -> np.ndarray:
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], axis=1)


def _upcast(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def solve_products(cfg: Config, solver: jaxinf.Solver, info, ctx: dict) -> float:
    """Full-data curvature-vector products spent by the solves of all right-hand sides."""
    iters = np.asarray(info.iterations, np.float64)
    name = solver.name
    if name.startswith(("cg", "block_cg")):
        return float(np.sum(iters + 1))  # one per iteration, one for the true residual
    if name == "lissa":  # minibatches of 64; a check batch of up to 16 minibatches at each window end (8, 16, 32, ...)
        frac, check = min(1.0, 64 / ctx["N"]), min(1.0, 16 * 64 / ctx["N"])
        window_ends = np.floor(np.log2(np.maximum(iters, 8) / 8)) + 1
        return float(np.sum(iters * frac + window_ends * check + 1))
    return 0.0


def problem_arguments(parser: argparse.ArgumentParser, *, damping: float, repeats: int, name: str) -> None:
    """The options shared by the scripts that use ``common.mlp_problem`` (sizes, dtype, damping, timing, output)."""
    add = parser.add_argument
    add("--damping", type=float, default=damping, help="damping λ of (C + λI)⁻¹, the same for every method")
    add("--n-train", type=int, default=1000, help="training points (columns of the influence matrix)")
    add("--n-test", type=int, default=50, help="test points (rows of the influence matrix)")
    add("--d-in", type=int, default=32, help="input features of the MLP")
    add("--widths", type=int, nargs="+", default=[32], help="hidden-layer widths of the tanh MLP (10 classes)")
    add("--batch-size", type=int, default=500, help="training points per batch")
    add("--dtype", default="float32", choices=["float32", "float64"], help="dtype of the methods (reference: float64)")
    add("--repeats", type=int, default=repeats, help="timed calls after the compiling first one (median reported)")
    add("--seed", type=int, default=0, help="random seed of data, model and solvers")
    add("--name", default=name, help="base name of the result files: <name>.json, .md, ...")


# The --quick methods of suite.py and loo.py: one configuration per branch of the products bookkeeping (CG's
# iterations, LiSSA's minibatch steps, a low-rank fit's products and no solve products).
QUICK_METHODS = ["cg rtol=0.01", "lissa T=100 bs=64", "arnoldi r=10"]
QUICK = dict(n_train=200, n_test=5, d_in=8, widths=[8], batch_size=100, repeats=1, methods=QUICK_METHODS)


def run(args) -> tuple[list[dict], dict]:
    jax.config.update("jax_enable_x64", True)  # for the float64 reference; the methods run in args.dtype
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    problem = common.mlp_problem(
        args.n_train, args.n_test, d_in=args.d_in, widths=tuple(args.widths), dtype=dtype, seed=args.seed
    )
    batches = split(problem.train, args.batch_size)
    key = jax.random.key(args.seed)
    floor = common.gradient_floor(problem, args.repeats)

    def build(solver, params=problem.params, cfg=None):
        curvature = cfg.curvature if cfg is not None and cfg.curvature is not None else args.curvature
        damping = cfg.damping if cfg is not None and cfg.damping is not None else args.damping
        return common.influence_model(problem, solver, damping=damping, curvature=curvature, params=params)

    # ---- the exact reference, float64
    start = time.perf_counter()
    p64, train64, test64 = _upcast(problem.params), _upcast(batches), _upcast(problem.test)
    ref = build(jaxinf.direct(factorization="eigh"), p64).fit(train64)  # eigh: its spectrum is reported
    exact_factors = _ravel_rows(ref.influence_factors(test64))
    exact = np.asarray(ref.influences(test64, train64), np.float64)
    eig = np.concatenate([np.asarray(w) for w in ref.state.eigvals])
    ref_s = time.perf_counter() - start
    ctx = {
        "P": problem.num_params,
        "N": args.n_train,
        "damping": args.damping,
        "lam_max": float(eig.max()),
        "dtype": args.dtype,
        "params": problem.params,
    }
    meta = {
        "P": problem.num_params,
        "N": args.n_train,
        "n_test": args.n_test,
        "dtype": args.dtype,
        "curvature": args.curvature,
        "damping": args.damping,
        "batch_size": args.batch_size,
        "lam_max": float(eig.max()),
        "lam_min": float(eig.min()),
        "condition": float((eig.max() + args.damping) / max(eig.min() + args.damping, 1e-300)),
        "eigvals_above_damping": int(np.sum(eig > args.damping)),
        "reference": "direct (float64)",
        "reference_s": ref_s,
        "floor_s": floor.median,
        "floor_compile_s": floor.compile,
        "repeats": args.repeats,
        "command": "python benchmarks/suite.py " + " ".join(args.argv),
        "machine": common.machine(),
    }
    print(
        f"P = {meta['P']}, N = {meta['N']}, n_test = {meta['n_test']}, {args.dtype}, {args.curvature}, "
        f"damping = {args.damping}; eigenvalues in [{meta['lam_min']:.3g}, {meta['lam_max']:.3g}], "
        f"{meta['eigvals_above_damping']} above the damping; reference {ref_s:.1f} s; "
        f"per-example-gradient floor {floor.median * 1e3:.1f} ms",
        flush=True,
    )

    configs, notes = configurations(ctx, args.methods)
    meta["notes"] = notes
    for n in notes:
        print("note:", n, flush=True)
    grads = jax.jit(lambda p, b: per_example_grads(problem.loss_fn, p, b))(problem.params, problem.test)
    rows = []
    for cfg in configs:
        row = {"family": cfg.family, "method": cfg.label}
        try:
            solver = cfg.make(ctx)
            model = build(solver, cfg=cfg)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fit_t, state = common.time_call(lambda m=model: m.fit(batches, key=key).state, args.repeats)
                if cfg.scores_only:  # no factors: scored through the solver's Scorer
                    solve_t, factors, info = None, None, None
                else:
                    solve_jit = jax.jit(lambda s, g, solver=solver: solve_many(solver, s, g))
                    solve_t, (factors, info) = common.time_call(lambda s=state, f=solve_jit: f(s, grads), args.repeats)
                score_t, scores = common.time_call(lambda m=model: m.influences(problem.test, batches), args.repeats)
            row.update(
                {
                    "fit_s": fit_t.median,
                    "fit_compile_s": fit_t.compile,
                    "influences_s": score_t.median,
                    "influences_compile_s": score_t.compile,
                    "total_s": fit_t.median + score_t.median,
                    "total_x_floor": (fit_t.median + score_t.median) / floor.median,
                    "influences_x_floor": score_t.median / floor.median,
                    "fit_products": float(cfg.fit_products(ctx)),
                    **compare(scores, exact),
                    "warnings": sorted({str(w.message).split(".")[0] for w in caught}),
                }
            )
            if info is not None:
                row.update(_solve_row(cfg, solver, solve_t, factors, info, exact_factors, ctx))
        except (ConvergenceError, ValueError) as e:  # a method that cannot run here is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(_line(row), flush=True)
    return rows, meta


def _solve_row(cfg: Config, solver, solve_t, factors, info, exact_factors, ctx: dict) -> dict:
    """The columns of a method that gives influence factors: solve time, products, convergence, factor error."""
    got_factors = _ravel_rows(factors)
    converged = np.asarray(info.converged)
    return {
        "solve_s": solve_t.median,
        "solve_compile_s": solve_t.compile,
        "solve_products": solve_products(cfg, solver, info, ctx),
        "iterations_max": int(np.max(np.asarray(info.iterations))),
        "converged": f"{int(converged.sum())}/{converged.size}",
        "ihvp_rel_err": float(np.linalg.norm(got_factors - exact_factors) / np.linalg.norm(exact_factors)),
    }


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['method']}: {row['error']}"
    return (
        f"{row['method']}: fit {row['fit_s']:.3g}s (+{row['fit_compile_s']:.2g}s compile), "
        f"influences {row['influences_s']:.3g}s, {row['total_x_floor']:.3g}x floor, "
        + (f"ihvp err {row['ihvp_rel_err']:.2e}, " if "ihvp_rel_err" in row else "no factors, ")
        + f"pearson {row['pearson']:.4f}, spearman {row['spearman']:.4f}, converged {row.get('converged', '-')}"
    )


COLUMNS = [
    "method",
    "fit_s",
    "fit_compile_s",
    "solve_s",
    "influences_s",
    "influences_compile_s",
    "total_x_floor",
    "fit_products",
    "solve_products",
    "converged",
    "ihvp_rel_err",
    "infl_rel_err",
    "pearson",
    "spearman",
    "top10",
    "top100",
    "harmful_top10",
]


def plot(rows: list[dict], meta: dict, path: str) -> None:
    """Accuracy against time, one line per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    families = list(dict.fromkeys(r["family"] for r in ok))
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, fam in enumerate(families):
        pts = sorted((r for r in ok if r["family"] == fam), key=lambda r: r["total_x_floor"])
        x = [r["total_x_floor"] for r in pts]
        style = dict(marker="o", color=cmap(k % 10), label=fam)
        axes[0].plot(x, [max(r.get("ihvp_rel_err", np.nan), 1e-12) for r in pts], **style)  # baselines: none
        axes[1].plot(x, [max(1 - r["pearson"], 1e-12) for r in pts], **style)
    for ax, ylabel in zip(axes, ["inverse-HVP relative error", "1 − Pearson(influences, exact)"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fit + influences time / per-example-gradient floor")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(
        f"P={meta['P']}, N={meta['N']}, n_test={meta['n_test']}, {meta['dtype']}, {meta['curvature']}, "
        f"λ={meta['damping']:g} (lower left is better)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument(
        "--methods", nargs="+", default=None, help="factory names, families or labels to run (default: all discovered)"
    )
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument(
        "--curvature", default="gauss_newton", choices=list(jaxinf.CURVATURES), help="curvature every method inverts"
    )
    problem_arguments(parser, damping=1e-3, repeats=3, name="suite")
    cli.add_quick(parser, "N=200, 5 test points, an 8-8-10 MLP, one repeat, methods " + ", ".join(QUICK_METHODS))
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = cli.parse(build_parser(), argv, QUICK)
    args.argv = argv
    if args.list:
        ctx = {"P": 1000, "N": args.n_train, "damping": args.damping, "lam_max": 1.0, "dtype": args.dtype}
        configs, notes = configurations(ctx, args.methods)
        for c in configs:
            print(f"{c.family:12s} {c.label}")
        for n in notes:
            print("note:", n)
        return [], {}
    rows, meta = run(args)
    table = common.write_results(args.name, rows, COLUMNS + ["error"] * any("error" in r for r in rows), meta)
    plot(rows, meta, os.path.join(common.results_dir(), f"{args.name}.png"))
    print(f"\nmachine: {meta['machine']}")
    print(
        f"P = {meta['P']}, N = {meta['N']}, n_test = {meta['n_test']}, {meta['dtype']}, {meta['curvature']}, "
        f"damping = {meta['damping']}; reference: {meta['reference']} ({meta['reference_s']:.1f} s); "
        f"per-example-gradient floor {meta['floor_s'] * 1e3:.1f} ms"
    )
    print(table)
    print(f"wrote {os.path.join(common.results_dir(), args.name)}.{{json,md,png}}")
    return rows, meta


if __name__ == "__main__":
    main()
