"""The main job: find mislabelled digits with influence functions.

Run ``python -m jaxinf.demo --help`` for options. It

1. loads scikit-learn's digits (8×8 images that ship with the package),
2. flips the labels of a few training points,
3. trains a small Flax NNX MLP with optax,
4. fits the exact solver (``jaxinf.direct``) on the Gauss-Newton curvature,
5. prints, for a few test points, the most helpful and most harmful training
   points,
6. ranks the training points to find the flipped labels four ways:
   self-influence ``∇ℓ_jᵀ (C + λI)⁻¹ ∇ℓ_j``, two free baselines — the
   per-example training loss and the gradient norm² ``‖∇ℓ_j‖²`` (TracIn's
   self-influence at the final checkpoint, no curvature) — and the total harm
   to the test set ``Σ_i I[i, j]`` (most negative first) — and says which
   finds more and why,
7. writes ``influence_demo.png`` (detection curves, and the most helpful and
   harmful training images per test digit, flipped ones with their given and
   true label) and ``summary.json`` to the output folder.

Why the rankings differ: a flipped label makes its own point badly fitted, so
both its loss and its self-influence are high — the two "is this point odd?"
rankings find flipped labels almost perfectly. Harm to the test set asks
another question, "which points make these test predictions worse?": a
flipped point harms only test digits that look like it, and correct but
atypical points can harm more, so it finds fewer flips. Use self-influence
(or the loss) to find mislabelled data, and test influence to explain
specific predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import jaxinf
from jaxinf.solvers.similarity import tracin_self_influence


class MLP(nnx.Module):
    """``64 → hidden → 10`` tanh MLP."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


class DigitsData(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray  # possibly flipped labels
    y_clean: np.ndarray
    flipped: np.ndarray  # indices of flipped training points
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(n_train: int, n_test: int, n_flip: int, seed: int) -> DigitsData:
    """Digits scaled to [0, 1], shuffled, split, with ``n_flip`` training labels changed."""
    from sklearn.datasets import load_digits as sk_digits

    x, y = sk_digits(return_X_y=True)
    if n_train + n_test > len(x):
        raise ValueError(f"n_train + n_test must be <= {len(x)} (the digits data set), got {n_train + n_test}.")
    if not 0 <= n_flip <= n_train:
        raise ValueError(f"n_flip must be between 0 and n_train={n_train}, got {n_flip}.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x = (x[order] / 16.0).astype(np.float32)
    y = y[order].astype(np.int32)
    x_train, y_train, x_test, y_test = (
        x[:n_train],
        y[:n_train],
        x[n_train : n_train + n_test],
        y[n_train : n_train + n_test],
    )
    flipped = np.sort(rng.choice(n_train, size=n_flip, replace=False))
    noisy = y_train.copy()
    noisy[flipped] = (y_train[flipped] + rng.integers(1, 10, size=n_flip)) % 10
    return DigitsData(x_train, noisy, y_train, flipped, x_test, y_test)


def cross_entropy(logits, batch):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))


def train(data: DigitsData, hidden: int, steps: int, weight_decay: float, seed: int):
    """Full-batch AdamW; returns ``(graphdef, params)`` with ``params`` an ``nnx.State``."""
    model = MLP(hidden, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.adamw(1e-2, weight_decay=weight_decay)
    opt_state = opt.init(params)
    batch = (jnp.asarray(data.x_train), jnp.asarray(data.y_train))

    def loss(p):
        return cross_entropy(nnx.merge(graphdef, p)(batch[0]), batch)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    for _ in tqdm(range(steps), desc="training", leave=False):
        params, opt_state, value = step(params, opt_state)
    return graphdef, params, float(value)


def per_example_losses(graphdef, params, data: DigitsData):
    """Training loss of each point under its given (possibly flipped) label: the free baseline."""
    logits = nnx.merge(graphdef, params)(jnp.asarray(data.x_train))
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(data.y_train))


def accuracy(graphdef, params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(nnx.merge(graphdef, params)(jnp.asarray(x)), -1) == jnp.asarray(y)))


def plot(data: DigitsData, test_ids, influences, k: int) -> None:
    """Per test digit: the test image, its k most helpful and k most harmful training images (on a new figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flipped = set(data.flipped.tolist())
    fig, axes = plt.subplots(len(test_ids), 1 + 2 * k, figsize=(1.6 * (1 + 2 * k), 1.9 * len(test_ids)), squeeze=False)
    for row, t in enumerate(test_ids):
        order = np.argsort(influences[row])
        picks = [("test", t, None)] + [("helpful", j, influences[row, j]) for j in order[::-1][:k]]
        picks += [("harmful", j, influences[row, j]) for j in order[:k]]
        for col, (kind, j, score) in enumerate(picks):
            ax = axes[row, col]
            ax.axis("off")
            if kind == "test":
                ax.imshow(data.x_test[j].reshape(8, 8), cmap="gray_r")
                ax.set_title(f"test #{j}\nlabel {data.y_test[j]}", fontsize=8)
                continue
            ax.imshow(data.x_train[j].reshape(8, 8), cmap="Greens" if kind == "helpful" else "Reds")
            label = f"given {data.y_train[j]}, true {data.y_clean[j]}" if j in flipped else f"label {data.y_train[j]}"
            ax.set_title(f"{kind} I={score:+.2g}\n{label}", fontsize=7, color="purple" if j in flipped else "black")
    fig.suptitle(
        "Per test digit (left, grey): the most helpful (green) and most harmful (red) training digits, with their "
        "influence I;\nflipped training labels are titled in purple with the given (wrong) and the true label",
        fontsize=8,
    )


def plot_detection(ax, recalls: dict, n_flip: int, n_train: int) -> None:
    """Recall of the flipped labels among the top-k of each ranking, against k."""
    ks = np.arange(1, len(next(iter(recalls.values()))) + 1)
    for (name, curve), style in zip(recalls.items(), ("-", "--", "-.", ":")):
        ax.plot(ks, curve, style, label=name)
    ax.plot(ks, np.minimum(ks * n_flip / n_train, n_flip), color="grey", lw=0.8, label="random ranking (expected)")
    ax.axvline(n_flip, color="grey", lw=0.5, ls=":", label="k = number of flipped labels")
    ax.set_xlabel("k: training points inspected, in ranking order")
    ax.set_ylabel(f"flipped labels found (of {n_flip})")
    ax.set_title("Finding the flipped labels: which ranking finds them first?", fontsize=9)
    ax.legend(fontsize=7)


def rankings(influences, self_influence, losses, gradient_norm) -> dict:
    """Training indices, most suspicious first, by each criterion."""
    return {
        "self-influence (highest first)": np.argsort(-self_influence),
        "training loss (highest first; free baseline)": np.argsort(-losses),
        "gradient norm² (TracIn self-influence; no curvature)": np.argsort(-gradient_norm),
        "harm to the test set (most negative Σ_i I[i, j] first)": np.argsort(influences.sum(axis=0)),
    }


def detection(order: dict, flipped: set, k_max: int) -> dict:
    """``{name: found[k-1]}``: flipped labels among the first ``k`` of each ranking, k = 1..k_max."""
    return {name: np.cumsum([int(j) in flipped for j in idx[:k_max]]) for name, idx in order.items()}


def save_figure(path: str, data: DigitsData, shown, influences, recalls: dict, n_flip: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot(data, shown, influences[shown], k=3)
    fig = plt.gcf()
    fig.set_size_inches(fig.get_size_inches()[0], fig.get_size_inches()[1] + 3.2)
    fig.subplots_adjust(bottom=0.42, top=0.86)
    ax = fig.add_axes((0.1, 0.06, 0.8, 0.28))
    plot_detection(ax, recalls, n_flip, len(data.x_train))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def influence_scores(data, graphdef, params, args: argparse.Namespace):
    """Exact Gauss-Newton influences of every training point on every test point, and self-influences."""

    def model_fn(p, batch):
        return nnx.merge(graphdef, p)(batch[0])

    def loss_fn(p, batch):
        return cross_entropy(model_fn(p, batch), batch)

    train_batches = [
        (jnp.asarray(data.x_train[i : i + args.batch_size]), jnp.asarray(data.y_train[i : i + args.batch_size]))
        for i in range(0, args.n_train, args.batch_size)
    ]
    model = jaxinf.InfluenceModel(
        loss_fn,
        params,
        jaxinf.direct(),
        damping=args.damping,
        curvature="gauss_newton",
        model_fn=model_fn,
        output_loss=cross_entropy,
    )
    with tqdm(total=3, desc="influence", leave=False) as bar:
        t_fit = time.perf_counter()
        model.fit(train_batches)
        t_fit = time.perf_counter() - t_fit
        bar.update()
        test = (jnp.asarray(data.x_test), jnp.asarray(data.y_test))
        influences = np.asarray(model.influences(test, train_batches))  # (n_test, n_train)
        bar.update()
        self_influence = np.asarray(model.self_influence(train_batches))
        bar.update()
    # the curvature-free baseline: ‖∇θℓ(z_j)‖², gradient_dot's self-influence = TracIn's at the final checkpoint
    gradient_norm = np.asarray(tracin_self_influence(loss_fn, [params], 1.0, train_batches))
    return influences, self_influence, gradient_norm, t_fit


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    data = load_digits(args.n_train, args.n_test, args.n_flip, args.seed)
    print(f"digits: {args.n_train} training points ({args.n_flip} labels flipped), {args.n_test} test points")
    graphdef, params, final_loss = train(data, args.hidden, args.steps, args.weight_decay, args.seed)
    num_params = sum(a.size for a in jax.tree.leaves(params))
    print(
        f"trained MLP 64-{args.hidden}-10 ({num_params} parameters): train loss {final_loss:.3f}, "
        f"test accuracy {accuracy(graphdef, params, data.x_test, data.y_test):.3f}"
    )

    influences, self_influence, gradient_norm, t_fit = influence_scores(data, graphdef, params, args)

    shown = list(range(min(args.show, args.n_test)))
    flipped = set(data.flipped.tolist())
    for t in shown:
        order = np.argsort(influences[t])

        def fmt(js, t=t):
            return ", ".join(
                f"#{j} (label {data.y_train[j]}{'*' if j in flipped else ''}, {influences[t, j]:+.3g})" for j in js
            )

        print(f"test #{t} (label {data.y_test[t]}):")
        print(f"  most helpful: {fmt(order[::-1][:3])}")
        print(f"  most harmful: {fmt(order[:3])}")

    k = 2 * args.n_flip
    losses = np.asarray(per_example_losses(graphdef, params, data))
    order = rankings(influences, self_influence, losses, gradient_norm)
    recalls = detection(order, flipped, min(3 * args.n_flip, args.n_train) or 1)
    found = {name: int(curve[min(k, len(curve)) - 1]) for name, curve in recalls.items()}
    expected_random = k * args.n_flip / args.n_train
    print(f"flipped labels among the {k} top-ranked training points (random ranking: {expected_random:.1f} expected):")
    for name, n in found.items():
        print(f"  {name:<56} {n}/{args.n_flip}")
    best = max(found, key=found.get)
    print(
        f"best here: {best}. A flipped label makes its own point badly fitted, so its loss and self-influence are "
        "high; harm to the test set measures another thing (which points make these test predictions worse)."
    )
    found_self, found_loss, found_gradient, found_harmful = found.values()
    figure = os.path.join(args.out, "influence_demo.png")
    save_figure(figure, data, shown, influences, recalls, args.n_flip)
    summary = {
        "n_train": args.n_train,
        "n_test": args.n_test,
        "n_flip": args.n_flip,
        "num_params": int(num_params),
        "damping": args.damping,
        "fit_seconds": round(t_fit, 3),
        "flipped_in_top_harmful": found_harmful,
        "flipped_in_top_self_influence": found_self,
        "flipped_in_top_loss": found_loss,
        "flipped_in_top_gradient_norm": found_gradient,
        "top_k": k,
        "random_expectation": expected_random,
        "figure": figure,
        "total_seconds": round(time.perf_counter() - t0, 3),
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {figure} and summary.json ({summary['total_seconds']:.1f} s in all)")
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--n-flip", type=int, default=20, help="training labels to corrupt")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=400, help="full-batch training steps")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--show", type=int, default=3, help="test points to print and plot")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
