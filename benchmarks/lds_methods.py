"""Every solver at its defaults, against retraining and against exact influence, at ``damping="auto"``.

    python benchmarks/lds_methods.py            # the 4 MLP problems of benchmarks/damping.py, 100 retrained models
    python benchmarks/lds_methods.py --quick    # one problem, 24 retrained models, 20 test points

The problems, the retraining and the score are those of ``benchmarks/damping.py``
(tanh MLP classifiers trained with Adam from a fixed ``θ₀``, float64; ``M``
models retrained on random halves ``S_m`` of the training set). Each method
is run as a user runs it: ``jaxinf.InfluenceModel(loss_fn, params, solver,
curvature="gauss_newton", model_fn=..., output_loss=..., damping=λ)``, then
``fit(train)`` and ``influences(test, train)``, with the solver's own defaults
(the ranks of Arnoldi and Nyström, which have none, are ``--rank``). ``λ`` is
the value ``damping="auto"`` chooses (``AUTO_SCALE · tr(C)/P``, read from a
first ``direct`` model's ``damping_value``), the same for every method, except
``gradient_dot`` (no curvature, ``damping=0``).

Per method and problem:

* **LDS** — the linear datamodeling score against retraining (Park et al.
  2023): the mean over test points of the Spearman correlation, over the
  ``M`` subsets, of ``−Σ_{j ∈ S_m} I[t, j]`` with the retrained test loss;
* Pearson, Spearman and top-10 overlap of the influence matrix with the exact
  one (``direct`` at the same ``λ``), since users act on rankings;
* ``first_s`` (the first model's fit + influences, compiling) and ``warm_s``
  (a second, new model of the same configuration: what a loop over
  checkpoints or dampings pays).

A method that raises (a solver that does not converge at its defaults under
``strict=True``) is reported with its error, not dropped; ``lissa, strict=False``
is LiSSA's answer at its defaults when it does not converge (its warning
silenced here, since the row above reports it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli as cli  # noqa: E402
import _metrics as metrics  # noqa: E402
import common  # noqa: E402
import damping as damping_bench  # noqa: E402

import jaxinf  # noqa: E402
from jaxinf.core.damping import AUTO_SCALE  # noqa: E402


def methods(rank: int) -> dict:
    """The solvers compared, each at its defaults (``rank`` for the two that need one)."""
    return {
        "direct": jaxinf.direct(),
        "cg": jaxinf.cg(),
        "cg(block=True)": jaxinf.cg(block=True),
        "lissa": jaxinf.lissa(),
        "lissa, strict=False": jaxinf.lissa(),
        f"arnoldi({rank})": jaxinf.arnoldi(rank),
        f"nystrom({rank})": jaxinf.nystrom(rank),
        "kfac": jaxinf.kfac(),
        "ekfac": jaxinf.ekfac(),
        "gradient_dot": jaxinf.gradient_dot(),
    }


def scores(problem: dict, solver, damping, strict: bool = True) -> tuple[np.ndarray, float]:
    """``(I, seconds)``: a new model's fit + influences of the test points on the training points.

    ``strict=False``: a solve that does not converge warns (its answer is kept) instead of raising.
    """
    start = time.perf_counter()
    model = jaxinf.InfluenceModel(
        None,
        problem["params"],
        solver,
        damping=damping,
        curvature="gauss_newton",
        model_fn=problem["model_fn"],
        output_loss=problem["output_loss"],
        strict=strict,
    )
    model.fit(problem["train"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if not strict else "default")
        matrix = np.asarray(model.influences(problem["test"], problem["train"]))
    return matrix, time.perf_counter() - start


def run_problem(spec, args) -> list[dict]:
    problem = damping_bench.retrained(spec, args.n_test, args.subsets, args.noise)
    auto = jaxinf.InfluenceModel(
        None,
        problem["params"],
        jaxinf.direct(),
        damping="auto",
        curvature="gauss_newton",
        model_fn=problem["model_fn"],
        output_loss=problem["output_loss"],
    ).fit(problem["train"])
    lam = float(auto.damping_value)
    exact, _ = scores(problem, jaxinf.direct(), lam)
    print(f"{spec[0]}: λ = {lam:.4g} (damping='auto'), retrained in {problem['retrain_s']:.1f} s", flush=True)
    rows = []
    for name, solver in methods(args.rank).items():
        row = {"problem": spec[0], "method": name, "damping": 0.0 if name == "gradient_dot" else lam}
        strict = "strict=False" not in name
        try:
            matrix, row["first_s"] = scores(problem, solver, row["damping"], strict)
            _, row["warm_s"] = scores(problem, solver, row["damping"], strict)
        except jaxinf.ConvergenceError as e:  # reported, not dropped (any other error is a bug: it stops the run)
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            print(f"  {name}: {row['error']}", flush=True)
            rows.append(row)
            continue
        row["lds"] = damping_bench.lds(matrix, problem["masks"], problem["actual"])
        row.update(metrics.agreement(matrix, exact, ks=(10,)))
        agree = f"Pearson {row['pearson']:.3f}, Spearman {row['spearman']:.3f}"
        print(f"  {name}: LDS {row['lds']:.3f}, {agree}", flush=True)
        rows.append(row)
    return rows


def mean_rows(rows: list[dict], columns: list[str]) -> list[dict]:
    """Per method, the mean of each numeric column over the problems (a method that failed anywhere: its errors)."""
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        errors = [r["error"] for r in mine if "error" in r]
        mean = {"problem": "mean", "method": name}
        if errors:
            mean["error"] = f"{len(errors)}/{len(mine)} problems: {errors[0]}"
        else:
            mean.update({c: float(np.mean([r[c] for r in mine])) for c in columns})
        out.append(mean)
    return out


QUICK = dict(subsets=24, n_test=20, problems=1, rank=20)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--subsets", type=int, default=100, help="retrained models (random halves of the training set)")
    p.add_argument("--n-test", type=int, default=40, help="test points")
    p.add_argument("--noise", type=float, default=0.1, help="share of training and test labels flipped")
    p.add_argument("--problems", type=int, default=len(damping_bench.PROBLEMS), help="how many problems to run")
    p.add_argument("--rank", type=int, default=100, help="rank of arnoldi and nystrom (they have no default)")
    cli.add_quick(p, "one problem, 24 retrained models, 20 test points, rank 20")
    return p


def main(argv=None) -> None:
    args = cli.parse(build_parser(), argv, QUICK)
    rows = [r for spec in damping_bench.PROBLEMS[: args.problems] for r in run_problem(spec, args)]
    numeric = ["lds", "pearson", "spearman", "top10", "first_s", "warm_s"]
    columns = ["problem", "method", "damping", *numeric, "error"]
    meta = {"subsets": args.subsets, "n_test": args.n_test, "rank": args.rank, "auto_scale": AUTO_SCALE}
    print(common.write_results("lds_methods", [*rows, *mean_rows(rows, numeric)], columns, meta))


if __name__ == "__main__":
    main()
