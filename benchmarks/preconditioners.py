"""CG pre-conditioners (none / Jacobi / Nyström / K-FAC / EK-FAC) and Arnoldi's completion, against exact influence.

    python benchmarks/preconditioners.py                 # MLP, CNN, transformer block; P ≈ 2.3–2.6k, float64
    python benchmarks/preconditioners.py --quick         # smoke test at toy sizes
    python benchmarks/preconditioners.py --models cnn --damping-rel 1e-2
    python benchmarks/preconditioners.py --budgets 4 8 16 32 64 --nystrom-rank 50 200 --kfac-damping-multiple 1 10
    python benchmarks/preconditioners.py --block --models cnn transformer --arnoldi-rank 0   # + block CG rows

Three Flax Linen classifiers (a tanh MLP; a CNN: conv, average pool, dense,
dense; a transformer block: embedding, self-attention, layer norms, MLP, mean
pool, head), each trained for ``--train-steps`` Adam steps on labels of a
random teacher of the same architecture, so that ``direct()`` (the exact
Gauss-Newton influence) is affordable. The damping is ``--damping-rel``
times the mean eigenvalue of the Gauss-Newton ``C`` (``trace(C)/P``, from a
Hutchinson estimate); the default 0.1 is where plain CG reaches ``rtol=1e-6``
in about 160 iterations on the MLP and the CNN (at 1e-3 it needs over 1,000:
condition numbers 6.8e4 instead of 680–810). For each model and method it prints

* ``iters``: mean CG iterations per test point to ``--rtol``; ``solve_products``:
  curvature-vector products per test point (iterations + 1 for the true
  residual, a lower bound: each residual replacement, when the recursive
  residual had drifted above the true one, costs one more; 0 for the K-FAC
  and low-rank answers, which do no products in the solve); ``rel_res``: the largest true relative residual
  ``‖v − (C + λI)x‖ / ‖v‖`` CG reports (``converged`` counts those within
  ``--rtol``); ``fit_cost``: what ``init`` spends (products, or passes over the
  data for K-FAC/EK-FAC, whose ``fisher="exact"`` pass takes one backward pass
  per class and example);
* ``fit_cold_s`` / ``fit_warm_s``: the jitted ``init``, first call (compile +
  run) and the median of ``--repeats`` further calls; ``solve_cold_s`` /
  ``solve_warm_s``: the same for the solves of all test points (vmapped);
* ``pearson``, ``spearman``, ``top10``, ``top100``: the influence matrix
  ``(n_test, n_train)`` against ``direct()``'s (``_metrics.agreement``;
  ``topk``: mean overlap of each test point's ``k`` most positive training
  examples, ``k`` capped at ``n_train``).

* ``to_target`` / ``to_target_fraction``: issue 15's measure, the fewest
  curvature-vector products (the pre-conditioner's fit — Jacobi ``s``,
  Nyström ``r`` products, K-FAC/EK-FAC none, only passes over the data — plus
  ``k + 1`` for CG stopped after ``k`` iterations, ``k`` in ``--budgets``) at
  which the influence matrix reaches ``--target`` (Pearson ≥ 0.99 and
  Spearman ≥ 0.98 against ``direct()``), and that number over plain CG's
  products to ``--rtol``; empty when no budget reached it. The whole curve
  (agreement after ``k`` iterations, per row) is in
  ``preconditioners.budgets.json`` / ``.md``.

``--block`` adds a ``block_cg+...`` row per CG row: :func:`jaxinf.cg` with ``block=True`` and
``block_size = --n-test``, all test gradients one block sharing one block Krylov space (Ji & Li 2017);
one product per test point per block iteration, so the products are counted as for plain CG.

Several ``--nystrom-rank`` values give one row each (a high rank is the
issue's alternative to deflation); ``--kfac-damping-multiple c`` gives K-FAC/
EK-FAC rows with ``M = K + c·λ`` (the pre-conditioner damped ``c`` times
more than the operator). Rows ``kfac``/``ekfac`` (as answers) and
``arnoldi r=... completion=...`` put the approximate methods next to the
pre-conditioned CG. Writes ``benchmarks/results/preconditioners.json`` and
``.md``, and ``preconditioners.budgets.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli as cli  # noqa: E402
import _metrics  # noqa: E402
import common  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxinf  # noqa: E402
from jaxinf.core.tree import ravel_batched  # noqa: E402
from jaxinf.scoring import per_example_grads  # noqa: E402
from jaxinf.solvers.cg import _block_solve as block_solve  # noqa: E402
from jaxinf.solvers.krylov import pcg  # noqa: E402
from jaxinf.solvers.preconditioners import hutchinson_diagonal  # noqa: E402

MODELS = ("mlp", "cnn", "transformer")
PRECONDITIONERS = ("none", "jacobi", "nystrom", "kfac", "ekfac")
QUICK = dict(
    size="tiny",
    models=["mlp"],
    preconditioners=["none", "nystrom", "ekfac"],
    n_train=64,
    n_test=4,
    train_steps=20,
    nystrom_rank=[20],
    jacobi_samples=20,
    arnoldi_rank=16,
    damping_rel=1e-2,
    maxiter=300,
    repeats=1,
    kfac_damping_multiple=[1.0],
    budgets=[2, 8, 32],
)


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


class MLP(nn.Module):
    width: int
    classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes)(nn.tanh(nn.Dense(self.width)(x)))


class CNN(nn.Module):
    features: int
    width: int
    classes: int

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(self.features, (3, 3), padding="SAME")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        if self.width:
            x = nn.tanh(nn.Dense(self.width)(x))
        return nn.Dense(self.classes)(x)


class Transformer(nn.Module):
    dim: int
    heads: int
    classes: int

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.dim)(x)
        h = h + nn.SelfAttention(num_heads=self.heads, qkv_features=self.dim)(nn.LayerNorm()(h))
        y = nn.LayerNorm()(h)
        h = h + nn.Dense(self.dim)(nn.gelu(nn.Dense(2 * self.dim)(y)))
        return nn.Dense(self.classes)(h.mean(axis=1))


def architecture(name: str, size: str):
    """``(module, input shape per example, classes)``; ``size``: ``"full"`` (P ≈ 2.3–2.6k) or ``"tiny"``."""
    full = size == "full"
    if name == "mlp":
        return (MLP(96, 10), (16,), 10) if full else (MLP(12, 4), (8,), 4)
    if name == "cnn":
        return (CNN(8, 16, 10), (8, 8, 1), 10) if full else (CNN(3, 0, 4), (6, 6, 1), 4)
    if name == "transformer":
        return (Transformer(16, 2, 10), (8, 8), 10) if full else (Transformer(4, 1, 4), (4, 4), 4)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def cross_entropy(logits, batch):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))


def problem(name: str, size: str, n_train: int, n_test: int, steps: int, seed: int):
    """Params trained on a random teacher's labels, ``model_fn``, train and test batches (float64)."""
    module, shape, classes = architecture(name, size)
    kx, kt, ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n_train + n_test, *shape), jnp.float64)
    # Linen initialises float32 parameters even under x64: cast them, or the products would be float32-rounded
    # (CG then stalls short of rtol = 1e-6: 3 of 20 transformer test points at 500 iterations, residual 0.05)
    init = lambda k: jax.tree.map(lambda a: a.astype(jnp.float64), module.init(k, x[:1]))  # noqa: E731
    teacher = init(kt)
    y = jnp.argmax(module.apply(teacher, x) * 3.0, axis=-1)  # a learnable task
    params = init(ks)

    def model_fn(p, batch):
        return module.apply(p, batch[0])

    def loss_fn(p, batch):
        return cross_entropy(model_fn(p, batch), batch)

    train, test = (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss_fn)(p, train)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, model_fn, loss_fn, train, test


# ----------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------


def methods(args, n_classes: int) -> list[tuple[str, jaxinf.Solver, str, object, int]]:
    """``(label, solver, fit cost, pre-conditioner, fit products)`` rows, the pre-conditioned CGs first."""
    fisher = {"fisher": args.fisher}
    passes = f"×{n_classes} classes" if args.fisher == "exact" else ""
    pre = {
        "none": [(None, "0", 0)],
        "jacobi": [
            (jaxinf.jacobi_preconditioner(args.jacobi_samples), f"{args.jacobi_samples} products", args.jacobi_samples)
        ],
    }
    pre["nystrom"] = [(jaxinf.nystrom_preconditioner(r), f"{r} products", r) for r in args.nystrom_rank]
    for name, factory, cost in (
        ("kfac", jaxinf.kfac_preconditioner, "1 pass"),
        ("ekfac", jaxinf.ekfac_preconditioner, "2 passes"),
    ):
        pre[name] = [(factory(damping_multiple=c, **fisher), f"{cost}{passes}", 0) for c in args.kfac_damping_multiple]
    rows = [
        (
            f"{'block_' if block else ''}cg+{p.name if p is not None else name}",
            jaxinf.cg(
                rtol=args.rtol,
                maxiter=args.maxiter,
                preconditioner=p,
                block=block,
                block_size=args.n_test if block else None,
            ),
            cost,
            p,
            products,
        )
        for block in ((False, True) if args.block else (False,))
        for name in args.preconditioners
        for p, cost, products in pre[name]
    ]
    r = args.arnoldi_rank
    rows += [
        ("kfac (answer)", jaxinf.kfac(**fisher), f"1 pass{passes}", None, 0),
        ("ekfac (answer)", jaxinf.ekfac(**fisher), f"2 passes{passes}", None, 0),
    ]
    if r == 0:  # --arnoldi-rank 0: no Arnoldi rows
        return rows
    rows += [
        (
            f"arnoldi r={r} completion=False",
            jaxinf.arnoldi(r, completion=False),
            f"{2 * r + 10} products",
            None,
            2 * r + 10,
        ),
        (f"arnoldi r={r} completion=auto", jaxinf.arnoldi(r), f"{2 * r + 10} products", None, 2 * r + 10),
    ]
    return rows


def truncated_cg(pre, state, test_grads, train_grads, exact, budgets, block=False) -> list[dict]:
    """Influence agreement of CG stopped after ``k`` iterations, for each ``k`` in ``budgets``.

    Runs jaxinf's own kernel (:func:`jaxinf.solvers.krylov.pcg`, from ``x₀ = 0``) with a zero tolerance and
    ``maxiter = k`` (traced: one compiled program for every ``k``), pre-conditioned by ``pre`` (``None``: plain);
    it costs ``k`` products plus one for the true residual, as ``jaxinf.cg(maxiter=k)`` would. ``block``: the
    block kernel (:func:`jaxinf.solvers.krylov.block_pcg`) on all test points as one block, ``k`` block
    iterations (``k`` products per test point, plus one for the true residuals).
    """

    def solve(st, g, k):
        precond = (lambda r: r) if pre is None else (lambda r: pre.apply(st.preconditioner, r))  # noqa: E731
        if block:
            return block_solve(st.operator, precond, g, g_count, 0.0, 0.0, k)
        return jax.vmap(lambda b: pcg(st.operator.matvec, precond, b, 0.0, 0.0, k))(g)

    g_count = jax.tree.leaves(test_grads)[0].shape[0]
    solve = jax.jit(solve)
    out = []
    for k in budgets:
        factors, info = solve(state, test_grads, jnp.asarray(k, jnp.int32))
        assert int(np.max(info.iterations)) <= k
        influences = np.asarray(ravel_batched(factors)) @ train_grads.T
        out.append({"k": int(k), "solve_products": int(k) + 1, **_metrics.agreement(influences, exact, ks=(10,))})
    return out


def run_method(solver, operator, test_grads, train_grads, exact, repeats: int, pre=None, budgets=()) -> dict:
    """Fit (cold, warm), solve every test gradient (cold, warm), and compare the influence matrix with ``exact``.

    For a CG row with ``budgets``, ``row["curve"]`` is :func:`truncated_cg`'s agreement after ``k`` iterations.
    """
    init = jax.jit(lambda op, key: solver.init(op, key=key))
    key = jax.random.key(0)
    fit_t, state = common.time_call(lambda: init(operator, key), repeats)
    if solver.validate is not None:
        solver.validate(state)
    many = solver.solve_many or jax.vmap(solver.solve, in_axes=(None, 0))
    solve = jax.jit(lambda s, g: many(s, g))
    solve_t, (factors, info) = common.time_call(lambda: solve(state, test_grads), repeats)
    influences = np.asarray(ravel_batched(factors)) @ train_grads.T
    iterations = np.asarray(info.iterations, np.float64)
    is_cg = solver.name.startswith(("cg", "block_cg"))
    norms = np.linalg.norm(np.asarray(ravel_batched(test_grads)), axis=1)
    row = {
        "iters": float(iterations.mean()) if is_cg else "",
        "rel_res": float(np.max(np.asarray(info.residual_norm) / norms)) if is_cg else "",
        "solve_products": float(iterations.mean() + 1) if is_cg else 0.0,
        "converged": f"{int(np.sum(info.converged))}/{iterations.size}",
        "fit_cold_s": fit_t.first,
        "fit_warm_s": fit_t.median,
        "solve_cold_s": solve_t.first,
        "solve_warm_s": solve_t.median,
    }
    if is_cg and budgets:
        row["curve"] = truncated_cg(pre, state, test_grads, train_grads, exact, budgets, solver.solve_many is not None)
    return {**row, **_metrics.agreement(influences, exact, ks=(10, 100))}


def run_model(name: str, args) -> list[dict]:
    params, model_fn, loss_fn, train, test = problem(
        name, args.size, args.n_train, args.n_test, args.train_steps, args.seed
    )
    kw = dict(kind="gauss_newton", model_fn=model_fn, output_loss=cross_entropy)
    undamped = jaxinf.curvature_operator(None, params, train, damping=0.0, **kw)
    diag, _ = jax.jit(hutchinson_diagonal, static_argnums=1)(undamped, 32, jax.random.key(1))
    damping = float(args.damping_rel * jnp.mean(diag))  # λ = rel · trace(C) / P
    operator = undamped.with_damping(damping)
    test_grads = per_example_grads(loss_fn, params, test)
    train_grads = np.asarray(ravel_batched(per_example_grads(loss_fn, params, train)))
    direct = jaxinf.direct()
    start = time.perf_counter()
    exact_factors, _ = jax.vmap(direct.solve, in_axes=(None, 0))(direct.init(operator), test_grads)
    exact = np.asarray(ravel_batched(exact_factors)) @ train_grads.T
    direct_s = time.perf_counter() - start
    classes = architecture(name, args.size)[2]
    head = {"model": name, "P": operator.size, "N": args.n_train, "n_test": args.n_test, "damping": damping}
    rows = [{**head, "method": "direct (reference)", "fit_cost": f"{operator.size} products", "fit_cold_s": direct_s}]
    print(f"{name}: P = {operator.size}, N = {args.n_train}, n_test = {args.n_test}, λ = {damping:.3g}", flush=True)
    for label, solver, cost, pre, fit_products in methods(args, classes):
        try:
            row = run_method(solver, operator, test_grads, train_grads, exact, args.repeats, pre, args.budgets)
        except (ValueError, TypeError, NotImplementedError) as e:  # reported in the table, the run goes on
            row = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
        rows.append({**head, "method": label, "fit_cost": cost, "fit_products": fit_products, **row})
        print(f"  {label}: {row}", flush=True)
    return rows


def products_to_target(rows: list[dict], pearson: float, spearman: float) -> list[dict]:
    """Per model and CG row: the fewest products (fit + truncated solve) whose influences reach the target.

    ``fraction`` divides them by plain CG's products to ``--rtol`` (the ``cg+none`` row of the same model);
    ``to_target`` is empty when no budget reached the target. One row per budget, too, for the curve table.
    """
    out = []
    for row in rows:
        if "curve" not in row:
            continue
        base = next((r for r in rows if r["model"] == row["model"] and r["method"] == "cg+none"), None)
        base_products = base["solve_products"] if base is not None and "solve_products" in base else None
        reached = None
        for point in row["curve"]:
            products = point["solve_products"] + row["fit_products"]
            hit = point["pearson"] >= pearson and point["spearman"] >= spearman
            reached = products if reached is None and hit else reached
            fraction = products / base_products if base_products else ""
            out.append(
                {
                    "model": row["model"],
                    "method": row["method"],
                    "k": point["k"],
                    "products": products,
                    "fraction": fraction,
                    "pearson": point["pearson"],
                    "spearman": point["spearman"],
                    "top10": point["top10"],
                    "target": "yes" if hit else "",
                }
            )
        row["to_target"] = reached if reached is not None else ""
        row["to_target_fraction"] = reached / base_products if reached is not None and base_products else ""
    return out


COLUMNS = [
    "model",
    "P",
    "method",
    "iters",
    "rel_res",
    "solve_products",
    "fit_cost",
    "fit_cold_s",
    "fit_warm_s",
    "solve_cold_s",
    "solve_warm_s",
    "pearson",
    "spearman",
    "top10",
    "top100",
    "converged",
    "to_target",
    "to_target_fraction",
    "error",
]
BUDGET_COLUMNS = ["model", "method", "k", "products", "fraction", "pearson", "spearman", "top10", "target"]


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    add = parser.add_argument
    add("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run")
    add("--size", default="full", choices=["full", "tiny"], help="model size: full (P ≈ 2.3–2.6k) or tiny")
    add(
        "--preconditioners",
        nargs="+",
        default=list(PRECONDITIONERS),
        choices=list(PRECONDITIONERS),
        help="CG pre-conditioners to compare",
    )
    add("--n-train", type=int, default=512, help="training examples N")
    add("--n-test", type=int, default=20, help="test points (right-hand sides)")
    add("--train-steps", type=int, default=300, help="full-batch Adam steps before measuring")
    add("--damping-rel", type=float, default=1e-1, help="damping λ as a multiple of the mean eigenvalue trace(C)/P")
    add("--rtol", type=float, default=1e-6, help="CG relative tolerance")
    add(
        "--maxiter",
        type=int,
        default=500,
        help="CG iterations cap (bounds the run time; a row that hits it shows converged < n_test)",
    )
    add(
        "--fisher",
        default="exact",
        choices=["exact", "sampled", "empirical"],
        help="K-FAC/EK-FAC Fisher (pre-conditioners and answers)",
    )
    add("--jacobi-samples", type=int, default=100, help="Hutchinson probes of the Jacobi pre-conditioner")
    add(
        "--nystrom-rank",
        type=int,
        nargs="+",
        default=[50, 200],
        help="ranks of the Nyström pre-conditioner (one row each; a high rank is the issue's deflation alternative)",
    )
    add(
        "--kfac-damping-multiple",
        type=float,
        nargs="+",
        default=[1.0, 10.0],
        help="K-FAC/EK-FAC pre-conditioners M = K + c·λ, one row per c (damping_multiple)",
    )
    add(
        "--budgets",
        type=int,
        nargs="+",
        default=[2, 4, 8, 16, 32, 64],
        help="CG iterations k at which pre-conditioned CG is stopped and its influences compared with exact",
    )
    add(
        "--block",
        action="store_true",
        help="also block CG rows (block_cg+...): all test points one block (block_size = --n-test)",
    )
    add(
        "--target",
        type=float,
        nargs=2,
        default=[0.99, 0.98],
        metavar=("PEARSON", "SPEARMAN"),
        help="agreement target of products_to_target (issue 15: 0.99 0.98)",
    )
    add(
        "--arnoldi-rank",
        type=int,
        default=100,
        help="rank of the Arnoldi rows (with and without completion); 0: no Arnoldi rows",
    )
    add("--repeats", type=int, default=3, help="warm calls timed after the first (median)")
    add("--seed", type=int, default=0, help="seed of data, teacher and initialisation")
    cli.add_quick(
        parser,
        "the tiny MLP only (P ≈ 140–200), pre-conditioners none, nystrom and ekfac, N = 64, 4 test points, "
        "20 training steps, small ranks, damping-rel 1e-2, maxiter 300",
    )
    return parser


def main(argv=None):
    args = cli.parse(build_parser(), argv, QUICK)
    jax.config.update("jax_enable_x64", True)
    rows = [row for name in args.models for row in run_model(name, args)]
    curve = products_to_target(rows, *args.target)
    meta = {k: v for k, v in vars(args).items()}
    print(common.write_results("preconditioners.budgets", curve, BUDGET_COLUMNS, meta))
    table = common.write_results("preconditioners", rows, COLUMNS, meta)
    print(table)
    return rows


if __name__ == "__main__":
    main()
