"""K-FAC and EK-FAC: fit time, eigenvalue-correction time, scoring time and accuracy against ``direct``.

    python benchmarks/bench_kfac.py                 # MLP and small CNN, N=500, 20 test points
    python benchmarks/bench_kfac.py --n-train 4000 --n-test 100 --dtype float32

For each model (a tanh MLP and a two-convolution CNN, softmax classifiers
trained briefly on a random teacher task) and each method (K-FAC, EK-FAC;
exact or sampled true Fisher) it reports

* fit: ``solver.init`` (factors over all batches, eigendecompositions and, for
  EK-FAC, the eigenvalue correction), compile time apart; the eigenvalue
  correction's cost is EK-FAC's fit minus K-FAC's, measured in the same run;
* score: ``solver.score`` for ``n_test × n_train`` influences (layer-wise
  contraction), and its ratio to the per-example-gradient floor (one jitted
  pass of per-example gradients over the test and training points);
* accuracy: Pearson and Spearman correlation of the influence matrix with
  ``direct`` on the full Gauss-Newton, and Pearson with the layer-block-diagonal
  Gauss-Newton (what a perfect per-layer method would reach);
* work: backward passes per example (K-FAC uses no curvature-vector product;
  ``direct`` uses ``P``).

All at the same damping, ``0.1 × mean eigenvalue`` of the Gauss-Newton. Prints
a table and writes ``benchmarks/results/kfac.json`` (and ``.md``; ``--quick``:
a smoke test at toy sizes, under ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import _cli as cli  # noqa: E402
import common  # noqa: E402

import jaxinf  # noqa: E402


class CNN(nn.Module):
    channels: int = 6
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(self.channels, (3, 3), padding="SAME")(x))
        x = nn.tanh(nn.Conv(self.channels, (3, 3), strides=2, padding="VALID")(x))
        return nn.Dense(self.classes)(x.reshape((x.shape[0], -1)))


def cnn_problem(n_train, n_test, *, size=8, channels=2, width=6, dtype=jnp.float64, seed=0, train_steps=200):
    """A small CNN classifier (8x8x2 images, ``width`` channels per convolution) trained briefly (Adam, full batch)
    on a random teacher task."""
    kx, kt, ki = jax.random.split(jax.random.key(seed), 3)
    n = n_train + n_test
    x = jax.random.normal(kx, (n, size, size, channels), jnp.float32).astype(dtype)
    teacher = jax.random.normal(kt, (size * size * channels, 10), jnp.float32).astype(dtype)
    y = jnp.argmax(x.reshape(n, -1) @ teacher / size + 0.5 * jax.random.normal(ki, (n, 10)), axis=-1)
    module = CNN(channels=width)
    params = jax.tree.map(lambda a: a.astype(dtype), jax.jit(module.init)(jax.random.key(seed + 1), x[:1]))

    def model_fn(p, batch):
        return module.apply(p, batch[0])

    def loss_fn(p, batch):
        return common.cross_entropy(model_fn(p, batch), batch)

    train, test = (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
    opt = optax.adam(1e-2)

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, s = carry
            u, s = opt.update(jax.grad(loss_fn)(p, train), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, opt.init(p)), None, length=train_steps)[0][0]

    params = fit(params)
    num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    return common.Problem(loss_fn, model_fn, common.cross_entropy, params, train, test, num_params)



def pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def run_model(name, problem, args, rows):
    batches = [
        jax.tree.map(lambda a, i=i: a[i : i + args.batch_size], problem.train)
        for i in range(0, len(problem.train[1]), args.batch_size)
    ]
    n_train, n_test = len(problem.train[1]), len(problem.test[1])

    def operator(damping):
        return jaxinf.curvature_operator(
            problem.loss_fn,
            problem.params,
            batches,
            kind="gauss_newton",
            model_fn=problem.model_fn,
            output_loss=problem.output_loss,
            damping=damping,
        )

    floor = common.gradient_floor(problem, args.repeats)
    grads = jax.jit(lambda p, b: jaxinf.scoring.per_example_grads(problem.loss_fn, p, b))
    flat = lambda tree: jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(tree)  # noqa: E731
    g_test = flat(grads(problem.params, problem.test))
    g_train = flat(grads(problem.params, problem.train))

    # the reference: direct on the full Gauss-Newton (one dense factorisation, timed once with its compilation)
    start = time.perf_counter()
    direct = jaxinf.direct(factorization="eigh")  # eigh: the eigenvectors and eigenvalues are used below
    dstate = jax.block_until_ready(jax.jit(direct.init)(operator(0.0)))  # compile included
    direct_fit = time.perf_counter() - start
    q, w = dstate.factors[0], dstate.eigvals[0]
    damping = 0.1 * float(jnp.mean(w))
    ref = g_test @ (q @ ((q.T @ g_train.T) / (w + damping)[:, None]))
    curvature = (q * w) @ q.T
    op = operator(damping)
    leaf_sizes = [a.size for a in jax.tree.leaves(problem.params)]
    block_of = jaxinf.core.blocks.resolve_blocks(problem.params, "layer")[0]
    labels = np.repeat([block_of[i] for i in range(len(leaf_sizes))], leaf_sizes)
    block = jnp.where(jnp.asarray(labels[:, None] == labels[None, :]), curvature, 0.0)
    ref_block = g_test @ jnp.linalg.solve(block + damping * jnp.eye(block.shape[0]), g_train.T)
    base = dict(model=name, P=problem.num_params, N=n_train, n_test=n_test)
    nan = float("nan")
    rows.append(
        {**base, "method": "direct", "fisher": "GGN", "fit_s": direct_fit, "fit_compile_s": nan, "correction_s": 0.0,
         "score_s": nan, "score_x_floor": nan, "pearson": 1.0, "spearman": 1.0,
         "pearson_layer_blocks": pearson(ref, ref_block), "backward_per_example": f"{problem.num_params} CVPs"}
    )  # fmt: skip
    print(f"{name} (P = {problem.num_params}): direct reference {direct_fit:.2f} s", flush=True)

    classes = int(problem.model_fn(problem.params, jax.tree.map(lambda a: a[:1], problem.test)).shape[-1])
    fits = {}
    for fisher in args.fishers:
        for make in (jaxinf.kfac, jaxinf.ekfac):
            solver = make(fisher=fisher)
            init = jax.jit(lambda o, k, s=solver: s.init(o, key=k))
            fit, state = common.time_call(lambda f=init: f(op, jax.random.key(0)), args.repeats)
            score = jax.jit(solver.score)
            timing, scores = common.time_call(
                lambda f=score, s=state: f(s, op, problem.test, problem.train), args.repeats
            )
            fits[(fisher, solver.name)] = fit.median
            per_pass = classes if fisher == "exact" else 1
            passes = 2 if solver.name == "ekfac" else 1
            correction = fit.median - fits[(fisher, "kfac")] if solver.name == "ekfac" else 0.0
            rows.append(
                {**base, "method": solver.name, "fisher": fisher, "fit_s": fit.median, "fit_compile_s": fit.compile,
                 "correction_s": correction, "score_s": timing.median, "score_x_floor": timing.median / floor.median,
                 "pearson": pearson(ref, scores), "spearman": common.spearman(ref, scores),
                 "pearson_layer_blocks": pearson(ref_block, scores),
                 "backward_per_example": f"{passes * per_pass}"}
            )  # fmt: skip
            print(f"  {solver.name} fisher={fisher}: fit {fit.median:.3g} s (+{fit.compile:.2g} s compile), "
                  f"score {timing.median:.3g} s (+{timing.compile:.2g} s compile)", flush=True)
    return floor


QUICK = dict(
    n_train=64, n_test=4, batch_size=32, repeats=1, mlp_d_in=8, mlp_widths=[8], cnn_channels=2, fishers=["sampled"]
)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    add = parser.add_argument
    add("--n-train", type=int, default=500, help="training points (columns of the influence matrix)")
    add("--n-test", type=int, default=20, help="test points (rows of the influence matrix)")
    add("--batch-size", type=int, default=125, help="training points per batch of the factor sweep")
    add("--dtype", choices=["float32", "float64"], default="float64", help="dtype of models, data and solvers")
    add("--repeats", type=int, default=3, help="timed calls after the compiling first one (the median is reported)")
    add("--seed", type=int, default=0, help="random seed of the models' data and weights")
    add(
        "--models",
        nargs="+",
        default=["mlp", "cnn"],
        choices=["mlp", "cnn"],
        help="models to run: a tanh MLP and/or a two-convolution CNN on 8x8x2 images (10 classes each)",
    )
    add("--mlp-d-in", type=int, default=32, help="input features of the MLP")
    add("--mlp-widths", type=int, nargs="+", default=[32], help="hidden-layer widths of the MLP")
    add("--cnn-channels", type=int, default=6, help="output channels of each of the CNN's two convolutions")
    add(
        "--fishers",
        nargs="+",
        default=["exact", "sampled"],
        choices=["exact", "sampled"],
        help="K-FAC/EK-FAC output-loss curvature: exact (one backward pass per class) and/or sampled (one draw)",
    )
    cli.add_quick(
        parser, "N=64, 4 test points, batches of 32, an 8-8-10 MLP, a CNN of 2 channels, sampled Fisher, one repeat"
    )
    return parser


def main(argv=None):
    args = cli.parse(build_parser(), argv, QUICK)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    rows, floors = [], {}
    for name in args.models:
        if name == "mlp":
            widths = tuple(args.mlp_widths)
            problem = common.mlp_problem(
                args.n_train, args.n_test, d_in=args.mlp_d_in, widths=widths, dtype=dtype, seed=args.seed
            )
        else:
            problem = cnn_problem(args.n_train, args.n_test, width=args.cnn_channels, dtype=dtype, seed=args.seed)
        floors[name] = run_model(name, problem, args, rows).median
    columns = [
        "model",
        "P",
        "N",
        "n_test",
        "method",
        "fisher",
        "fit_s",
        "fit_compile_s",
        "correction_s",
        "score_s",
        "score_x_floor",
        "pearson",
        "spearman",
        "pearson_layer_blocks",
        "backward_per_example",
    ]
    meta = dict(vars(args), floor_s=floors, damping="0.1 x mean eigenvalue of the Gauss-Newton")
    table = common.write_results("kfac", rows, columns, meta)
    print(
        f"{common.machine()}; dtype {args.dtype}; per-example-gradient floor (s): "
        + ", ".join(f"{k} {v:.3g}" for k, v in floors.items())
    )
    print(table)


if __name__ == "__main__":
    main()
