"""Leave-one-out check (Koh & Liang 2017, Fig. 2): predicted against actual change of test loss.

    python benchmarks/loo.py                       # breast cancer, all 400 training points, 5 test points
    python benchmarks/loo.py --k 100 --methods direct cg arnoldi

An L2-regularised logistic regression (scikit-learn's breast-cancer data,
standardised, 30 features + bias) is trained to machine precision by Newton's
method in float64. Then it is retrained without each of ``K`` training points
(all of them by default) — the ``K`` retrainings run at once under
``jax.vmap``, each a Newton solve from the full-data optimum to a gradient
norm below 1e-12 — and the actual change of the loss of each of a few test
points (the ones with the highest loss) is compared with the prediction

    Δℓ(test_i) ≈ + I[i, j] / n,   I = influences(test, train),

for every jaxinf solver (discovered as in ``suite.py``). Reported per method:
Pearson and Spearman correlation of predicted against actual, per test point
then averaged, and the slope of the least-squares fit of actual on predicted (1 is perfect);
``first_call_s`` is fit + influences including compilation.

How the penalty enters. The training objective is
``(1/n) Σ_j [ℓ(x_j, y_j) + (α/2)‖w‖²]``; removing point ``j`` removes its
whole term, so its gradient includes ``αw``; the test quantity is the plain
log-loss. Both come from one ``loss_fn`` by carrying the penalty weight as a
batch leaf (``α`` for training points, ``0`` for test points). The curvature
is then the exact Hessian ``H + αP`` (``P`` selects the weights, not the
bias) with zero damping. Solvers that need ``λ > 0`` or that factor only the
data term (``nystrom``, ``kfac``, ``ekfac``) get the penalty as damping
``λ = α`` instead, with training gradients without ``αw``. That is a slightly
different model of the same retraining: its prediction for test point ``i``
is off by ``∇ℓ_iᵀ(H + αI)⁻¹αw / n`` (the same for every ``j``, which the
per-test-point correlation ignores) and the damping also acts on the bias.
For reference, ``direct`` in that form scores Pearson 0.983 / Spearman 0.969
against 0.987 / 0.999 in the exact form (defaults). The ``mode`` column says
which form each row used.

Writes ``benchmarks/results/loo.json``, ``loo.md`` and ``loo.png`` (``--quick``:
a smoke test with 20 retrainings and four methods, under
``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli as cli  # noqa: E402
import common  # noqa: E402
import suite  # noqa: E402

import jaxinf  # noqa: E402
from jaxinf import ConvergenceError  # noqa: E402

# Factories whose fit needs λ > 0 or that factor only the data term: penalty given as damping.
PENALTY_AS_DAMPING = ("nystrom", "kfac", "ekfac")


def load_data(n_train: int, seed: int):
    """Standardised breast-cancer data with labels in {0, 1}; a fixed random split."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = x[perm], y[perm].astype(np.float64)
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-12
    x = (x - mean) / std
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def model_fn(params, batch):
    return batch[0] @ params["w"] + params["b"]


def log_loss(logits, y):
    """Binary cross-entropy with logits, per example."""
    return jnp.logaddexp(0.0, logits) - y * logits


def output_loss(logits, batch):
    return jnp.mean(log_loss(logits, batch[1]))


def loss_fn(params, batch):
    """Mean over the batch of ``ℓ(x, y) + (r/2)‖w‖²`` with ``r`` the batch's third leaf."""
    x, y, r = batch
    return output_loss(model_fn(params, batch), batch) + 0.5 * jnp.mean(r) * jnp.sum(params["w"] ** 2)


def train(x, y, alpha, weights=None, params=None, *, iters: int = 40):
    """Newton's method on ``Σ_i m_i ℓ_i / Σ m + (α/2)‖w‖²`` in float64; returns params and gradient norm."""
    m = jnp.ones(x.shape[0]) if weights is None else weights
    if params is None:
        params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def objective(theta):
        p = unravel(theta)
        return jnp.sum(m * log_loss(x @ p["w"] + p["b"], y)) / jnp.sum(m) + 0.5 * alpha * jnp.sum(p["w"] ** 2)

    def step(_, theta):
        g = jax.grad(objective)(theta)
        return theta - jnp.linalg.solve(jax.hessian(objective)(theta), g)

    theta = jax.lax.fori_loop(0, iters, step, flat)
    return unravel(theta), jnp.linalg.norm(jax.grad(objective)(theta))


def leave_one_out(x, y, alpha, params, removed):
    """Parameters retrained without each training point in ``removed`` (vmapped Newton solves)."""

    def one(j):
        weights = jnp.ones(x.shape[0]).at[j].set(0.0)
        return train(x, y, alpha, weights, params, iters=12)

    return jax.jit(jax.vmap(one))(removed)


def _batch(x, y, r):
    return (jnp.asarray(x), jnp.asarray(y), jnp.full(x.shape[0], r, x.dtype))


def run(args):
    jax.config.update("jax_enable_x64", True)
    (xtr, ytr), (xte, yte) = load_data(args.n_train, args.seed)
    n, alpha = xtr.shape[0], args.alpha
    params, gnorm = jax.jit(lambda: train(jnp.asarray(xtr), jnp.asarray(ytr), alpha))()
    assert float(gnorm) < 1e-10, f"training did not converge: gradient norm {float(gnorm):.3g}"

    test_losses = np.asarray(log_loss(model_fn(params, (jnp.asarray(xte),)), jnp.asarray(yte)))
    chosen = np.argsort(-test_losses)[: args.n_test]
    test_with_r = _batch(xte[chosen], yte[chosen], 0.0)
    k = min(args.k, n)
    removed = jnp.asarray(np.random.default_rng(args.seed).permutation(n)[:k] if k < n else np.arange(n))

    start = time.perf_counter()
    loo_params, loo_gnorm = jax.block_until_ready(
        leave_one_out(jnp.asarray(xtr), jnp.asarray(ytr), alpha, params, removed)
    )
    retrain_s = time.perf_counter() - start
    assert float(jnp.max(loo_gnorm)) < 1e-10, f"a retraining did not converge: {float(jnp.max(loo_gnorm)):.3g}"
    test_loss = jax.vmap(lambda p: log_loss(model_fn(p, test_with_r), test_with_r[1]))
    actual = np.asarray(test_loss(loo_params) - test_loss(jax.tree.map(lambda a: a[None], params))).T  # (n_test, k)

    p = sum(int(np.size(a)) for a in jax.tree.leaves(params))
    ctx = {"P": p, "N": n, "damping": alpha, "dtype": "float64"}
    hess_eigs = np.linalg.eigvalsh(
        np.asarray(
            jax.hessian(lambda t: loss_fn(jax.flatten_util.ravel_pytree(params)[1](t), _batch(xtr, ytr, alpha)))(
                jax.flatten_util.ravel_pytree(params)[0]
            )
        )
    )
    ctx["lam_max"] = float(hess_eigs.max())
    configs, notes = suite.configurations(ctx, args.methods)
    meta = {
        "data": "sklearn breast_cancer (standardised)",
        "N": n,
        "n_test": len(chosen),
        "K": k,
        "P": p,
        "alpha": alpha,
        "retrain_s": retrain_s,
        "hessian_eigs": [float(hess_eigs.min()), float(hess_eigs.max())],
        "max_loo_grad_norm": float(jnp.max(loo_gnorm)),
        "notes": notes,
        "machine": common.machine(),
        "command": "python benchmarks/loo.py " + " ".join(args.argv),
    }
    print(
        f"N = {n}, P = {p}, alpha = {alpha}, {len(chosen)} test points (highest loss), K = {k} retrainings "
        f"in {retrain_s:.2f} s (max gradient norm {meta['max_loo_grad_norm']:.1e}); Hessian eigenvalues in "
        f"[{hess_eigs.min():.3g}, {hess_eigs.max():.3g}]",
        flush=True,
    )

    rows, predictions = [], {}
    for cfg in configs:
        as_damping = cfg.family.split("+")[0] in PENALTY_AS_DAMPING
        r, damping = (0.0, alpha) if as_damping else (alpha, 0.0)
        train_batch = _batch(xtr, ytr, r)
        row = {"method": cfg.label, "mode": "penalty as damping" if as_damping else "exact Hessian"}
        try:
            model = jaxinf.InfluenceModel(
                loss_fn,
                params,
                cfg.make(ctx),
                damping=damping,
                curvature="hessian",
                model_fn=model_fn,
                output_loss=output_loss,
                strict=False,
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                scores = model.fit(train_batch, key=jax.random.key(args.seed)).influences(test_with_r, train_batch)
                scores = np.asarray(jax.block_until_ready(scores))
                row["first_call_s"] = time.perf_counter() - start
            predicted = scores[:, np.asarray(removed)] / n
            predictions[cfg.label] = predicted
            pear = [np.corrcoef(predicted[i], actual[i])[0, 1] for i in range(len(chosen))]
            spear = [suite.spearman(predicted[i], actual[i]) for i in range(len(chosen))]
            slope = [
                np.dot(predicted[i] - predicted[i].mean(), actual[i] - actual[i].mean())
                / np.dot(predicted[i] - predicted[i].mean(), predicted[i] - predicted[i].mean())
                for i in range(len(chosen))
            ]
            row.update(
                pearson=float(np.mean(pear)),
                pearson_min=float(np.min(pear)),
                spearman=float(np.mean(spear)),
                slope=float(np.mean(slope)),
                warnings=sorted({str(w.message).split(".")[0] for w in caught}),
            )
        except (ConvergenceError, ValueError) as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(row["method"], {k_: v for k_, v in row.items() if k_ not in ("method", "warnings")}, flush=True)
    return rows, meta, actual, predictions


def plot(actual, predictions, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(predictions)
    cols = min(4, len(names))
    rows_ = -(-len(names) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 3.0 * rows_), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        pred = predictions[name]
        for i in range(actual.shape[0]):
            ax.scatter(actual[i], pred[i], s=6, alpha=0.6)
        lo = float(min(actual.min(), pred.min()))
        hi = float(max(actual.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("actual Δ test loss (retrained)", fontsize=8)
        ax.set_ylabel("predicted I/n", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    fig.suptitle(
        f"Leave-one-out, logistic regression (N={meta['N']}, K={meta['K']}, α={meta['alpha']:g}); colours: test points",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COLUMNS = ["method", "mode", "pearson", "pearson_min", "spearman", "slope", "first_call_s"]


QUICK = dict(n_train=100, n_test=2, k=20, methods=["direct", *suite.QUICK_METHODS])


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    add = parser.add_argument
    add("--methods", nargs="+", default=None, help="factory names, families or labels (default: all discovered)")
    add("--n-train", type=int, default=400, help="training points (of the 569 in the data set; the rest are test)")
    add("--n-test", type=int, default=5, help="test points compared (those with the highest loss)")
    add("--k", type=int, default=400, help="training points to leave out and retrain without (all when >= N)")
    add("--alpha", type=float, default=1e-2, help="L2 penalty α of the training objective, (α/2)‖w‖²")
    add("--seed", type=int, default=0, help="random seed of the train/test split and of the points left out")
    add("--name", default="loo", help="base name of the result files: <name>.json, .md, .png")
    cli.add_quick(parser, "N=100, 2 test points, 20 retrainings, methods direct, " + ", ".join(suite.QUICK_METHODS))
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = cli.parse(build_parser(), argv, QUICK)
    args.argv = argv
    rows, meta, actual, predictions = run(args)
    table = common.write_results(args.name, rows, COLUMNS + ["error"] * any("error" in r for r in rows), meta)
    if predictions:
        plot(actual, predictions, meta, os.path.join(common.results_dir(), f"{args.name}.png"))
    print(f"\nmachine: {meta['machine']}")
    print(table)
    return rows, meta


if __name__ == "__main__":
    main()
