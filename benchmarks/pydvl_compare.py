"""jaxinf and pyDVL side by side: same weights, same data, same λ, against one exact reference.

pyDVL is optional: nothing in jaxinf needs it, only this comparison. pyDVL
0.10.0 (the newest release) declares ``numpy<2``, which jax >= 0.10 cannot run
with, so ``pip install pydvl`` cannot resolve next to jaxinf; its influence
module does run on numpy 2. The recipe that installed and ran here (Python
3.11, numpy 2.4.6, jax 0.10.2, torch 2.13.0+cpu, pyDVL 0.10.0, distributed and
dask 2026.8.0, pandas 3.1.1, pyDeprecate 0.14.0), from the repository root::

    python -m venv .venv-pydvl && . .venv-pydvl/bin/activate
    pip install .                                      # jaxinf and its dependencies (numpy 2)
    pip install torch --index-url https://download.pytorch.org/whl/cpu   # a CPU build, not gigabytes of CUDA
    pip install --no-deps pydvl==0.10.0                # skip its numpy<2 pin
    pip install distributed pandas "pyDeprecate>=0.3.2"   # what pydvl.influence.torch imports (+ dask)
    python benchmarks/pydvl_compare.py --quick         # smoke test
    python benchmarks/pydvl_compare.py                 # the README's table
    python benchmarks/pydvl_compare.py --methods cg arnoldi --n-train 500

(``pip check`` then reports pyDVL's unmet numpy<2, numcodecs<0.16, cvxpy and
more-itertools requirements; the influence module imports none of them.)

The tanh MLP classifier of ``suite.py`` is trained in JAX; its weights are
copied into an equivalent ``torch.nn.Sequential`` (Linear/Tanh/Linear, kernels
transposed), checked to give the same logits. Both libraries then compute
``influences(test, train)`` with the **Hessian** of the mean cross-entropy
(pyDVL's default; its Gauss-Newton is the empirical Fisher ``(1/n) Σ g gᵀ``,
and in pyDVL 0.10.0 its dense form is mis-normalised: infinite with one batch,
about 6x too large with four) and the same regularisation ``λ``, method by
method with matching settings:

========================  ===========================================  ==================================
method                    jaxinf                                       pyDVL
========================  ===========================================  ==================================
direct                    ``direct()``                                 ``DirectInfluence``
cg                        ``cg(rtol)``                                 ``CgInfluence(rtol, atol=0)``
cg+jacobi                 ``cg(preconditioner=jacobi_preconditioner)``  ``CgInfluence(JacobiPreconditioner)``
cg+nystrom                ``cg(preconditioner=nystrom_preconditioner)`` ``CgInfluence(NystroemPreconditioner)``
block_cg                  ``cg(block=True)``                           ``CgInfluence(solve_simultaneously)``
lissa                     ``lissa(maxiter, scale, batch_size=64)``     ``LissaInfluence`` (batches of 64)
arnoldi (+completion)     ``arnoldi(r[, completion])``                 ``ArnoldiInfluence(r[, use_woodbury])``
nystrom                   ``nystrom(r)``                               ``NystroemSketchInfluence(r)``
kfac / ekfac              ``kfac()`` / ``ekfac()``                     ``EkfacInfluence(update_diagonal)``
inverse harmonic mean     —                                            ``InverseHarmonicMeanInfluence``
========================  ===========================================  ==================================

The exact reference is jaxinf's ``direct()`` in float64 on the same weights.
Each row gives, for each library, the fit and influence times (median after a
first call; jaxinf's compile time apart), the relative error of the influence
factors (pyDVL's flat factors are mapped to jaxinf's parameter order) and the
Pearson/Spearman correlation of the influence matrix with the reference, and
the speed ratio ``pydvl_total_s / jaxinf_total_s`` measured in the same run.
Writes ``benchmarks/results/pydvl_compare.{json,md}`` (``--quick``: a smoke
test at toy sizes, under ``benchmarks/results/quick/``). Exits with status 2 and
the install recipe when torch or pyDVL is not importable: a comparison that
was asked for and could not run is a failure, not a skip.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli as cli  # noqa: E402
import common  # noqa: E402
import suite  # noqa: E402

import jaxinf  # noqa: E402
from jaxinf import ConvergenceError
from jaxinf.scoring import per_example_grads  # noqa: E402
from jaxinf.solvers.base import solve_many  # noqa: E402

RECIPE = """Install them in an environment of their own (pyDVL 0.10.0 declares numpy<2; jax >= 0.10 needs numpy >= 2):
  python -m venv .venv-pydvl && . .venv-pydvl/bin/activate
  pip install .
  pip install torch --index-url https://download.pytorch.org/whl/cpu
  pip install --no-deps pydvl==0.10.0
  pip install distributed pandas "pyDeprecate>=0.3.2"
  python benchmarks/pydvl_compare.py --quick"""


def _imports():
    try:
        import torch  # noqa: F401
        from pydvl.influence.torch import DirectInfluence  # noqa: F401
    except (ImportError, TypeError, AttributeError) as e:  # missing, or a broken install (a wrong `deprecate`)
        return f"{type(e).__name__}: {e}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The same model in torch
# ----------------------------------------------------------------------------------------------------------------


def dense_layers(params) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(kernel (in, out), bias (out,)), ...]`` of the Linen MLP, in layer order."""
    inner = params["params"]
    names = sorted(inner, key=lambda k: int(k.split("_")[-1]))
    return [(np.asarray(inner[n]["kernel"]), np.asarray(inner[n]["bias"])) for n in names]


def torch_model(params, dtype):
    import torch

    layers = []
    dense = dense_layers(params)
    for i, (kernel, bias) in enumerate(dense):
        lin = torch.nn.Linear(kernel.shape[0], kernel.shape[1], dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(kernel.T.copy(), dtype=dtype))
            lin.bias.copy_(torch.as_tensor(bias.copy(), dtype=dtype))
        layers.append(lin)
        if i < len(dense) - 1:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def torch_to_jax_order(flat: np.ndarray, params) -> np.ndarray:
    """Rows of pyDVL's flat vectors (torch order: weight (out, in), bias per layer) in jaxinf's raveled order."""
    pieces, at = {}, 0
    for i, (kernel, bias) in enumerate(dense_layers(params)):
        n_w, n_b = kernel.size, bias.size
        w = flat[:, at : at + n_w].reshape(-1, kernel.shape[1], kernel.shape[0]).transpose(0, 2, 1)
        pieces[f"Dense_{i}"] = {"kernel": w, "bias": flat[:, at + n_w : at + n_w + n_b]}
        at += n_w + n_b
    tree = {"params": pieces}
    return np.concatenate([np.reshape(x, (flat.shape[0], -1)) for x in jax.tree.leaves(tree)], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Matching configurations: (label, jaxinf factory or None, pyDVL factory or None, data-loader batch size for pyDVL)
# ----------------------------------------------------------------------------------------------------------------


def configurations(ctx: dict):
    import torch.nn.functional as F
    from pydvl.influence.torch import (
        ArnoldiInfluence,
        CgInfluence,
        DirectInfluence,
        EkfacInfluence,
        InverseHarmonicMeanInfluence,
        LissaInfluence,
        NystroemSketchInfluence,
    )
    from pydvl.influence.torch.preconditioner import JacobiPreconditioner, NystroemPreconditioner

    lam, rtol, r, scale, it = ctx["damping"], ctx["rtol"], ctx["rank"], ctx["scale"], ctx["lissa_iters"]
    mi = min(10 * ctx["P"], 1000)  # CG iterations per right-hand side, both libraries
    kd = min(ctx["P"], 2 * r + 10)
    loss = F.cross_entropy

    def cg_pair(label, jx_pre, pd_pre, block=False):
        """CG with the same tolerance, iteration cap and pre-conditioner in both libraries (block: Ji & Li 2017)."""
        return (
            label,
            lambda: jaxinf.cg(rtol=rtol, maxiter=mi, preconditioner=jx_pre, block=block),
            lambda m: CgInfluence(
                m,
                loss,
                regularization=lam,
                rtol=rtol,
                atol=0.0,
                maxiter=mi,
                preconditioner=pd_pre,
                solve_simultaneously=block,
                warn_on_max_iteration=False,
            ),
            None,
        )

    return [
        ("direct", lambda: jaxinf.direct(), lambda m: DirectInfluence(m, loss, regularization=lam), None),
        cg_pair(f"cg rtol={rtol:g}", None, None),
        cg_pair(f"cg+jacobi rtol={rtol:g}", jaxinf.jacobi_preconditioner(100), JacobiPreconditioner(100)),
        cg_pair(f"cg+nystrom({r}) rtol={rtol:g}", jaxinf.nystrom_preconditioner(r), NystroemPreconditioner(r)),
        cg_pair(f"block_cg rtol={rtol:g}", None, None, block=True),
        (
            f"lissa T={it} s={scale:.3g}",
            lambda: jaxinf.lissa(maxiter=it, scale=scale, batch_size=64),
            lambda m: LissaInfluence(m, loss, regularization=lam, maxiter=it, scale=scale, warn_on_max_iteration=False),
            64,
        ),
        (
            f"arnoldi r={r}",
            lambda: jaxinf.arnoldi(r, krylov_dim=kd, completion=False),
            lambda m: ArnoldiInfluence(m, loss, regularization=lam, rank=r, krylov_dimension=kd),
            None,
        ),
        (
            f"arnoldi+completion r={r}",
            lambda: jaxinf.arnoldi(r, krylov_dim=kd, completion=True),
            lambda m: ArnoldiInfluence(m, loss, regularization=lam, rank=r, krylov_dimension=kd, use_woodbury=True),
            None,
        ),
        (
            f"nystrom r={r}",
            lambda: jaxinf.nystrom(r),
            lambda m: NystroemSketchInfluence(m, loss, regularization=lam, rank=r),
            None,
        ),
        (
            "kfac",
            (lambda: jaxinf.kfac()) if hasattr(jaxinf, "kfac") else None,
            lambda m: EkfacInfluence(m, update_diagonal=False, hessian_regularization=lam),
            None,
        ),
        (
            "ekfac",
            (lambda: jaxinf.ekfac()) if hasattr(jaxinf, "ekfac") else None,
            lambda m: EkfacInfluence(m, update_diagonal=True, hessian_regularization=lam),
            None,
        ),
        (
            "inverse harmonic mean",
            None,
            lambda m: InverseHarmonicMeanInfluence(m, loss, regularization=lam),
            None,
        ),
    ]


def _median_time(fn, repeats, *, slow: float = 10.0):
    """Median of ``repeats`` calls after a first one (torch has nothing to compile, but the first call warms
    caches); a first call slower than ``slow`` seconds (or any, in a ``--quick`` run) is not repeated and is the
    time reported."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    if first > slow or cli.QUICK:
        return first, out
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), out


def run(args):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    jax.config.update("jax_enable_x64", True)
    torch.set_num_threads(1 if cli.QUICK else os.cpu_count() or 1)
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    tdtype = torch.float64 if args.dtype == "float64" else torch.float32
    problem = common.mlp_problem(
        args.n_train, args.n_test, d_in=args.d_in, widths=tuple(args.widths), dtype=dtype, seed=args.seed
    )
    if args.n_train % args.batch_size:
        raise SystemExit("--n-train must be a multiple of --batch-size (pyDVL 0.10 averages ragged batches unweighted)")
    batches = suite.split(problem.train, args.batch_size)

    # the same model in torch
    tmodel = torch_model(problem.params, tdtype)
    x_tr, y_tr = (torch.as_tensor(np.array(a)) for a in problem.train)
    x_te, y_te = (torch.as_tensor(np.array(a)) for a in problem.test)
    y_tr, y_te = y_tr.long(), y_te.long()
    with torch.no_grad():
        gap = float(np.max(np.abs(tmodel(x_te).numpy() - np.asarray(problem.model_fn(problem.params, problem.test)))))
    tol = 1e-4 if args.dtype == "float32" else 1e-10
    assert gap < tol, f"the torch model differs from the JAX model by {gap:.3g}"

    def build(solver, params=problem.params):
        return common.influence_model(
            problem, solver, damping=args.damping, curvature="hessian", params=params
        )

    # exact reference: float64 direct on the Hessian
    p64, train64, test64 = suite._upcast(problem.params), suite._upcast(batches), suite._upcast(problem.test)
    ref = build(jaxinf.direct(factorization="eigh"), p64).fit(train64)  # eigh: the spectrum is reported
    exact_factors = suite._ravel_rows(ref.influence_factors(test64))
    exact = np.asarray(ref.influences(test64, train64), np.float64)
    eig = np.concatenate([np.asarray(w) for w in ref.state.eigvals])
    ctx = {
        "P": problem.num_params,
        "damping": args.damping,
        "rtol": args.rtol,
        "rank": min(args.rank, problem.num_params),
        "scale": float(5 * (eig.max() + args.damping)),
        "lissa_iters": args.lissa_iters,
    }
    meta = {
        "P": problem.num_params,
        "N": args.n_train,
        "n_test": args.n_test,
        "dtype": args.dtype,
        "curvature": "hessian",
        "damping": args.damping,
        "batch_size": args.batch_size,
        "hessian_eig_min": float(eig.min()),
        "hessian_eig_max": float(eig.max()),
        "torch_vs_jax_logits_max_gap": gap,
        "repeats": args.repeats,
        "machine": common.machine(),
        "torch": torch.__version__,
        "pydvl": _version("pydvl"),
        "torch_threads": torch.get_num_threads(),
        "command": "python benchmarks/pydvl_compare.py " + " ".join(args.argv),
    }
    if eig.min() + args.damping <= 0:
        meta["warning"] = (
            f"H + λI is indefinite (smallest eigenvalue {eig.min() + args.damping:.3g}): jaxinf's CG stops and reports "
            "divergence at non-positive curvature; raise --damping above the most negative Hessian eigenvalue"
        )
        print("warning:", meta["warning"], flush=True)
    print(
        f"P = {meta['P']}, N = {meta['N']}, n_test = {meta['n_test']}, {args.dtype}, Hessian, λ = {args.damping}; "
        f"Hessian eigenvalues in [{eig.min():.3g}, {eig.max():.3g}]; torch {meta['torch']}, pyDVL {meta['pydvl']}",
        flush=True,
    )
    grads = jax.jit(lambda p, b: per_example_grads(problem.loss_fn, p, b))(problem.params, problem.test)
    rows = []
    for label, jx, pd, loader_bs in configurations(ctx):
        if args.methods and not any(m in label for m in args.methods):
            continue
        row = {"method": label}
        if jx is not None:
            try:
                solver = jx()
                model = build(solver)
                solve_jit = jax.jit(lambda s, g, solver=solver: solve_many(solver, s, g))
                with warnings.catch_warnings(record=True):
                    warnings.simplefilter("always")
                    fit_t, state = common.time_call(
                        lambda m=model: m.fit(batches, key=jax.random.key(0)).state, args.repeats
                    )
                    _, (factors, _) = common.time_call(lambda s=state, f=solve_jit: f(s, grads), 1)
                    score_t, scores = common.time_call(
                        lambda m=model: m.influences(problem.test, batches), args.repeats
                    )
                f = suite._ravel_rows(factors)
                c = suite.compare(scores, exact)
                row.update(
                    jaxinf_fit_s=fit_t.median,
                    jaxinf_influences_s=score_t.median,
                    jaxinf_total_s=fit_t.median + score_t.median,
                    jaxinf_compile_s=fit_t.compile + score_t.compile,
                    jaxinf_ihvp_err=float(np.linalg.norm(f - exact_factors) / np.linalg.norm(exact_factors)),
                    jaxinf_pearson=c["pearson"],
                    jaxinf_spearman=c["spearman"],
                )
            except (ConvergenceError, ValueError) as e:
                row["jaxinf_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        try:
            loader = DataLoader(
                TensorDataset(x_tr, y_tr), batch_size=loader_bs or args.batch_size, shuffle=loader_bs is not None
            )
            pmodel = pd(tmodel)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit_s, pmodel = _median_time(lambda pm=pmodel, dl=loader: pm.fit(dl), args.repeats)
                _, pf = _median_time(lambda pm=pmodel: pm.influence_factors(x_te, y_te), 1)
                inf_s, pscores = _median_time(lambda pm=pmodel: pm.influences(x_te, y_te, x_tr, y_tr), args.repeats)
            pscores = pscores.detach().numpy()
            pf = torch_to_jax_order(pf.detach().numpy().astype(np.float64), problem.params)
            c = suite.compare(pscores, exact)
            row.update(
                pydvl_fit_s=fit_s,
                pydvl_influences_s=inf_s,
                pydvl_total_s=fit_s + inf_s,
                pydvl_ihvp_err=float(np.linalg.norm(pf - exact_factors) / np.linalg.norm(exact_factors)),
                pydvl_pearson=c["pearson"],
                pydvl_spearman=c["spearman"],
            )
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:  # reported in the row, not fatal
            row["pydvl_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        if "jaxinf_total_s" in row and "pydvl_total_s" in row:
            row["pydvl_over_jaxinf"] = row["pydvl_total_s"] / row["jaxinf_total_s"]
            row["pydvl_over_jaxinf_incl_compile"] = row["pydvl_total_s"] / (
                row["jaxinf_total_s"] + row["jaxinf_compile_s"]
            )
        rows.append(row)
        print(" ".join(f"{k}={common._fmt(v)}" for k, v in row.items()), flush=True)
    return rows, meta


def _version(name):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


COLUMNS = [
    "method",
    "jaxinf_total_s",
    "jaxinf_compile_s",
    "pydvl_total_s",
    "pydvl_over_jaxinf",
    "jaxinf_ihvp_err",
    "pydvl_ihvp_err",
    "jaxinf_pearson",
    "pydvl_pearson",
    "jaxinf_spearman",
    "pydvl_spearman",
]


# --quick: λ = 0.1 lies well above the most negative Hessian eigenvalue of the toy MLP (about -0.01), so H + λI is
# positive definite and both CGs converge (at λ = 1e-2 pyDVL's CG runs to maxiter on every right-hand side). One
# method per family: exact (direct), iterative (block CG; pyDVL's one-right-hand-side-at-a-time CG would be most
# of the run), Kronecker-factored (EK-FAC); pyDVL's calls are timed once (no repeat), torch on one thread.
QUICK = dict(
    n_train=100, n_test=5, d_in=8, widths=[8], batch_size=50, repeats=1, rank=5, lissa_iters=20, damping=0.1,
    rtol=1e-3, methods=["direct", "block_cg", "ekfac"],
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    add = parser.add_argument
    add("--methods", nargs="+", default=None, help="substrings of the method labels to run (default: all)")
    add("--rtol", type=float, default=1e-5, help="relative residual tolerance of CG, both libraries")
    add("--rank", type=int, default=50, help="rank of Arnoldi, Nyström and the Nyström pre-conditioner (capped at P)")
    add("--lissa-iters", type=int, default=1000, help="LiSSA iterations (minibatches of 64), both libraries")
    suite.problem_arguments(parser, damping=1e-2, repeats=2, name="pydvl_compare")
    cli.add_quick(
        parser,
        "N=100 in batches of 50, 5 test points, an 8-8-10 MLP, λ=0.1, rtol=1e-3, three methods (direct, block_cg, "
        "ekfac), pyDVL's calls timed once, torch on one thread",
    )
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = cli.parse(build_parser(), argv, QUICK)
    args.argv = argv
    missing = _imports()
    if missing:
        print(
            f"ERROR: pyDVL comparison cannot run: torch and pyDVL's influence module are not importable ({missing}).\n"
            + RECIPE,
            file=sys.stderr,
        )
        raise SystemExit(2)  # status 2, as documented: a comparison asked for and not run is a failure
    rows, meta = run(args)
    errors = [c for c in ("jaxinf_error", "pydvl_error") if any(c in r for r in rows)]
    table = common.write_results(args.name, rows, COLUMNS + errors, meta)
    print(
        f"\nmachine: {meta['machine']}; torch {meta['torch']} ({meta['torch_threads']} threads), pyDVL {meta['pydvl']}"
    )
    print(
        f"P = {meta['P']}, N = {meta['N']}, n_test = {meta['n_test']}, {meta['dtype']}, Hessian, "
        f"λ = {meta['damping']}; reference: jaxinf direct (float64); "
        f"times: median of {meta['repeats']} after a first call"
        + (" (pyDVL: one call, --quick)" if cli.QUICK else "")
    )
    print(table)
    return rows, meta


if __name__ == "__main__":
    main()
