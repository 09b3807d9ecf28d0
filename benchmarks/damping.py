"""How the damping moves influence's agreement with retraining, and the rule behind ``damping="auto"``.

    python benchmarks/damping.py              # 4 MLP problems, 100 retrained models each
    python benchmarks/damping.py --quick      # one problem, 24 retrained models

For each problem (a tanh MLP classifier on a noisy random-teacher task, trained
full-batch with Adam from a fixed initialisation ``θ₀`` for a fixed number of
steps, so not necessarily to convergence), ``M`` random halves ``S_m`` of the
training set are drawn and the model is **retrained** on each half from the
same ``θ₀`` with the same steps (all ``M`` at once under ``jax.vmap``). The
linear datamodeling score (LDS; Park et al. 2023, "TRAK") of an influence
matrix ``I`` is then the Spearman correlation, over the ``M`` subsets, of the
predicted and the actual test loss, averaged over the test points::

    predicted_m(t) = − Σ_{j ∈ S_m} I[t, j],      actual_m(t) = ℓ(θ_{S_m}, z_t)

(``I > 0`` is helpful: a training point that helps lowers the test loss.)

``I`` is the exact influence with the Gauss-Newton curvature ``G`` of the mean
training loss at the trained parameters (dense, float64, from one
eigendecomposition, so every damping is exact):
``I(λ) = ∇ℓ_testᵀ (G + λI)⁻¹ ∇ℓ_train``, for ``λ = α · tr(G)/P`` over a grid of
``α`` (``tr(G)/P`` is the mean eigenvalue of ``G``), next to the gradient dot
product (``λ → ∞``, up to scale: TracIn at the last checkpoint).

The rule ``damping="auto"`` of :class:`jaxinf.InfluenceModel` uses the ``α``
this script finds best over the problems (``jaxinf.core.damping.AUTO_SCALE``);
the table it prints (and writes to ``benchmarks/results/damping.md``) is the
measurement behind that choice.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.flatten_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from scipy import stats  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli as cli  # noqa: E402
import common  # noqa: E402

from jaxinf.core.curvature import curvature_operator, per_example_grads, to_dense  # noqa: E402
from jaxinf.core.damping import AUTO_SCALE  # noqa: E402

ALPHAS = (1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
# (name, seed, n_train, d_in, width, classes, steps): under- and well-trained, small and wider
PROBLEMS = (
    ("mlp-a 300 steps", 0, 256, 16, 32, 5, 300),
    ("mlp-a 2000 steps", 0, 256, 16, 32, 5, 2000),
    ("mlp-b 1000 steps", 1, 512, 32, 64, 10, 1000),
    ("mlp-c 1000 steps", 2, 384, 24, 48, 8, 1000),
)


def cross_entropy_each(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def make_problem(seed: int, n_train: int, d_in: int, width: int, classes: int, n_test: int, noise: float):
    """Data (train, test), the module and ``θ₀``; labels from a random linear teacher, ``noise`` of them flipped."""
    kx, kt, kn, kf, ki = jax.random.split(jax.random.key(seed), 5)
    n = n_train + n_test
    x = jax.random.normal(kx, (n, d_in))
    y = jnp.argmax(x @ jax.random.normal(kt, (d_in, classes)) + 0.5 * jax.random.normal(kn, (n, classes)), axis=-1)
    flip = jax.random.uniform(kf, (n,)) < noise
    y = jnp.where(flip, (y + 1) % classes, y)
    module = common.MLP((width,), classes)
    # Linen initialises float32 parameters even under x64: cast, so that training and the curvature are float64.
    theta0 = jax.tree.map(lambda a: a.astype(jnp.float64), module.init(ki, x[:1]))
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), module, theta0


def trainer(module, train, steps: int, lr: float = 1e-2):
    """``train(θ₀, mask)``: ``steps`` full-batch Adam steps on the mask-weighted mean cross-entropy."""
    x, y = train
    opt = optax.adam(lr)

    def loss(p, mask):
        return jnp.sum(mask * cross_entropy_each(module.apply(p, x), y)) / jnp.sum(mask)

    def run(theta0, mask):
        def step(carry, _):
            p, s = carry
            u, s = opt.update(jax.grad(loss)(p, mask), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=steps)[0][0]

    return run


def lds(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray) -> float:
    """Mean over test points of Spearman(−Σ_{j∈S_m} I[t, j], actual_m(t)) over the subsets ``m``."""
    predicted = -(masks @ scores.T)  # (M, n_test)
    per_test = [stats.spearmanr(predicted[:, t], actual[:, t])[0] for t in range(actual.shape[1])]
    return float(np.nanmean(per_test))


def retrained(spec, n_test: int, n_subsets: int, noise: float) -> dict:
    """Train the problem ``spec`` on all its data and on ``n_subsets`` random halves; the test losses of each.

    Returns a dict: ``train``, ``test``, ``params`` (trained on all), ``masks`` (``(M, n_train)``, 1 = in
    ``S_m``), ``actual`` (``(M, n_test)`` test losses of the retrained models), ``retrain_s``, and the loss split
    ``model_fn``, ``output_loss``, ``loss_fn`` (mean cross-entropy).
    """
    name, seed, n_train, d_in, width, classes, steps = spec
    train, test, module, theta0 = make_problem(seed, n_train, d_in, width, classes, n_test, noise)
    fit = jax.jit(trainer(module, train, steps))
    start = time.perf_counter()
    params = fit(theta0, jnp.ones(n_train))
    masks = np.asarray(jax.random.uniform(jax.random.key(seed + 100), (n_subsets, n_train)) < 0.5, np.float64)
    retrained_params = jax.jit(jax.vmap(fit, in_axes=(None, 0)))(theta0, jnp.asarray(masks))
    actual = np.asarray(jax.vmap(lambda p: cross_entropy_each(module.apply(p, test[0]), test[1]))(retrained_params))
    retrain_s = time.perf_counter() - start

    def model_fn(p, batch):
        return module.apply(p, batch[0])

    def output_loss(logits, batch):
        return jnp.mean(cross_entropy_each(logits, batch[1]))

    def loss_fn(p, batch):
        return output_loss(model_fn(p, batch), batch)

    return dict(
        train=train,
        test=test,
        params=params,
        masks=masks,
        actual=actual,
        retrain_s=retrain_s,
        model_fn=model_fn,
        output_loss=output_loss,
        loss_fn=loss_fn,
    )


def run_problem(spec, n_test: int, n_subsets: int, noise: float) -> dict:
    r = retrained(spec, n_test, n_subsets, noise)
    train, test, params, masks, actual = r["train"], r["test"], r["params"], r["masks"], r["actual"]
    model_fn, output_loss, loss_fn = r["model_fn"], r["output_loss"], r["loss_fn"]
    operator = curvature_operator(
        loss_fn, params, train, kind="gauss_newton", model_fn=model_fn, output_loss=output_loss, damping=0.0
    )
    dense = np.asarray(to_dense(operator))
    eigvals, eigvecs = np.linalg.eigh(0.5 * (dense + dense.T))
    mean_eig = float(np.trace(dense)) / dense.shape[0]

    def flat(grads):
        return np.asarray(jax.vmap(lambda g: jax.flatten_util.ravel_pytree(g)[0])(grads))

    g_test = flat(per_example_grads(loss_fn, params, test)) @ eigvecs
    g_train = flat(per_example_grads(loss_fn, params, train)) @ eigvecs
    row = {
        "problem": spec[0],
        "num_params": dense.shape[0],
        "n_train": len(train[1]),
        "train_loss": float(loss_fn(params, train)),
        "mean_eig": mean_eig,
        "retrain_s": r["retrain_s"],
    }
    for alpha in ALPHAS:
        lam = alpha * mean_eig
        row[f"lds@{alpha:g}"] = lds((g_test / (eigvals + lam)) @ g_train.T, masks, actual)
    row["lds@grad·grad"] = lds(g_test @ g_train.T, masks, actual)
    return row


QUICK = dict(subsets=24, n_test=20, problems=1)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--subsets", type=int, default=100, help="retrained models (random halves of the training set)")
    p.add_argument("--n-test", type=int, default=40, help="test points")
    p.add_argument("--noise", type=float, default=0.1, help="share of training and test labels flipped")
    p.add_argument("--problems", type=int, default=len(PROBLEMS), help="how many of the problems to run")
    cli.add_quick(p, "one problem, 24 retrained models, 20 test points")
    return p


def main(argv=None) -> None:
    args = cli.parse(build_parser(), argv, QUICK)
    rows = [run_problem(spec, args.n_test, args.subsets, args.noise) for spec in PROBLEMS[: args.problems]]
    for r in rows:
        eig, secs = r["mean_eig"], r["retrain_s"]
        print(f"{r['problem']}: P = {r['num_params']}, mean eigenvalue {eig:.3g}, retrained in {secs:.1f} s")
    columns = ["problem", *[f"lds@{a:g}" for a in ALPHAS], "lds@grad·grad"]
    mean = {"problem": "mean", **{c: float(np.mean([r[c] for r in rows])) for c in columns[1:]}}
    best = max(ALPHAS, key=lambda a: mean[f"lds@{a:g}"])
    meta = {"alphas": ALPHAS, "best_alpha": best, "auto_scale": AUTO_SCALE, "subsets": args.subsets}
    print(common.write_results("damping", [*rows, mean], columns, meta))
    print(f"best α (mean LDS over the problems): {best:g}; damping='auto' uses α = {AUTO_SCALE:g}")


if __name__ == "__main__":
    main()
