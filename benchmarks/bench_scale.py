"""Scale-out benchmark: streamed influence to disk against N, devices, and the scoring pick.

    python benchmarks/bench_scale.py                # N = 1e4, 1e5; 1 vs 8 devices at N = 1e5; scoring pick
    python benchmarks/bench_scale.py --large        # adds N = 1e6 (about 10x the 1e5 row's time)
    python benchmarks/bench_scale.py --only pick    # just the scoring-pick table

Three tables:

1. **Scaling with N** (one fresh process per row, one device): a tanh MLP
   classifier (``P`` parameters, ``common.mlp_problem``), the exact solver
   fitted on 4096 in-memory points, and ``InfluenceCalculator`` scoring 100
   test points against ``N`` training points **streamed from a raw file**
   (``np.fromfile`` per batch through an ``IterableSource``; no memmap, so
   the resident memory is honest) into a zarr store. Columns: ``run_s``
   (everything: reading, solving the 100 factors, scoring, writing),
   ``compile_s`` (the kernels, apart), ``floor_s`` (one jitted pass of
   per-example gradients over the same stream, the floor of any exact method),
   ``x_floor`` = run / floor, ``peak_mb`` (process peak RSS during the run)
   and ``growth_mb`` (peak minus the RSS before the run). Time should grow
   linearly in N and the growth stay flat.
2. **Devices**: the same run at ``--devices-n`` points with 1 and 8 simulated
   host devices (``--xla_force_host_platform_device_count``); the speed-up is
   bounded by the physical cores (``os.cpu_count()``), not by 8.
3. **Scoring pick**: for differently shaped cases (MLPs and CNNs, batch,
   number of factors) the median time of the three contractions
   (``"gradients"``: per-example gradients and a matrix product, ``"jvp"``:
   forward-mode projection, ``"layerwise"``: per-layer contraction) and the
   method ``jaxinf.scoring.choose_method`` picks from the traced layer sizes;
   ``pick_is_fastest`` says whether the pick was the fastest of the three and
   ``pick_over_best`` how much slower than the fastest it was.

Writes ``benchmarks/results/scale.json`` and ``scale.md`` (and one
``scale_<table>.json``/``.md`` per table; ``--quick``: a smoke test at toy
sizes, under ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _cli as cli  # noqa: E402  (argparse only: JAX starts later, after XLA_FLAGS is set)

D_IN, CLASSES = 32, 10


# ----------------------------------------------------------------------------
# One scaling run, in a fresh process (its device count and peak memory are its own)
# ----------------------------------------------------------------------------


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_data(directory: str, n: int, seed: int = 0, chunk: int = 1 << 16) -> None:
    """``n`` examples as raw float32 ``x`` (n × 32) and int32 ``y`` files, written in chunks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((D_IN, CLASSES)).astype(np.float32)
    with open(os.path.join(directory, "x.f32"), "wb") as fx, open(os.path.join(directory, "y.i32"), "wb") as fy:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            x = rng.standard_normal((m, D_IN)).astype(np.float32)
            y = np.argmax(x @ teacher + 0.5 * rng.standard_normal((m, CLASSES)), axis=1).astype(np.int32)
            x.tofile(fx)
            y.tofile(fy)


def file_source(directory: str, n: int, batch: int):
    """An ``IterableSource`` reading ``(x, y)`` batches from the raw files with ``np.fromfile``."""
    import numpy as np

    from jaxinf.scale import IterableSource

    def factory():
        with open(os.path.join(directory, "x.f32"), "rb") as fx, open(os.path.join(directory, "y.i32"), "rb") as fy:
            for start in range(0, n, batch):
                m = min(batch, n - start)
                yield np.fromfile(fx, np.float32, m * D_IN).reshape(m, D_IN), np.fromfile(fy, np.int32, m)

    return IterableSource(factory, num_examples=n, batch_size=batch)


def child(args: dict) -> dict:
    sys.path.insert(0, HERE)
    import common
    import jax

    import jaxinf
    from jaxinf import scale
    from jaxinf.scoring import per_example_grads

    n, batch = args["n"], args["batch"]
    problem = common.mlp_problem(
        args.get("fit_n", 4096),
        args["n_test"],
        d_in=D_IN,
        widths=tuple(args["widths"]),
        classes=CLASSES,
        train_steps=args.get("train_steps", 200),
    )
    start = time.perf_counter()
    model = common.influence_model(problem, jaxinf.direct(), damping=1e-3, curvature="gauss_newton").fit(problem.train)
    fit_s = time.perf_counter() - start
    source = file_source(args["data"], n, batch)
    mesh = scale.data_mesh() if args["devices"] > 1 else None
    calc = scale.InfluenceCalculator(model, mesh=mesh, test_block=args["n_test"], progress=False)
    start = time.perf_counter()
    plan = calc.plan(problem.test, source)
    compile_s = time.perf_counter() - start
    warm = file_source(args["data"], min(n, 2 * batch), batch)
    calc.run(problem.test, warm, os.path.join(args["store"], f"{args['tag']}-warm{n}-{args['devices']}"))
    before = _rss_mb("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    out = calc.run(problem.test, source, os.path.join(args["store"], f"{args['tag']}-n{n}-d{args['devices']}"))
    run_s = time.perf_counter() - start
    peak = _rss_mb("VmHWM") if reset else float("nan")
    assert out.shape == (args["n_test"], n)
    row = {
        "N": n,
        "devices": len(jax.devices()),
        "P": problem.num_params,
        "n_test": args["n_test"],
        "batch": batch,
        "method": plan.method,
        "fit_s": fit_s,
        "compile_s": compile_s,
        "run_s": run_s,
        "scores_per_s": args["n_test"] * n / run_s,
        "peak_mb": peak,
        "growth_mb": peak - before,
        "plan_mb": plan.total_bytes / 2**20,
    }
    if args["floor"]:
        # the same padded batches as the calculator (one compiled shape), the same stream
        grads = jax.jit(lambda p, b: per_example_grads(problem.loss_fn, p, b))
        jax.block_until_ready(grads(problem.params, source.first()))
        start = time.perf_counter()
        for b in source:
            jax.block_until_ready(grads(problem.params, scale.pad_batch(b, batch)))
        row["floor_s"] = time.perf_counter() - start
        row["x_floor"] = run_s / row["floor_s"]
    return row


def run_child(args: dict, script: str = __file__) -> dict:
    """Run ``script --child args`` in a fresh process (its own devices and peak memory); its last stdout line."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), "--child", json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# The scoring pick (in this process, one device)
# ----------------------------------------------------------------------------

PICK_CASES = [  # (model, shape, training batch, factors); MLP shape = hidden widths, CNN shape = (side, channels)
    ("mlp", (64,), 1024, 1),
    ("mlp", (512, 512), 64, 1),
    ("mlp", (256,), 512, 8),
    ("mlp", (32, 32, 32), 2048, 64),
    ("mlp", (64,), 1024, 256),
    ("cnn", (16, 16), 256, 1),
    ("cnn", (16, 16), 256, 16),
    ("cnn", (8, 32), 512, 64),
    ("cnn", (16, 16), 256, 256),
]
METHODS = ("gradients", "jvp", "layerwise")


def cnn_problem(side: int, channels: int, batch: int):
    """conv3x3 -> tanh -> 2x2 mean pool -> conv3x3 -> tanh -> dense (10 classes), random NHWC images."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Conv(channels, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), (2, 2))
            x = nn.tanh(nn.Conv(channels, (3, 3))(x))
            return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))

    module = CNN()
    x = jax.random.normal(jax.random.key(0), (batch, side, side, 3))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, CLASSES)
    params = module.init(jax.random.key(2), x[:1])

    def loss_fn(p, b):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(module.apply(p, b[0]), b[1]))

    return loss_fn, params, (x, y)


def _time_methods(common, contract, loss_fn, params, batch, factors: int, repeats: int) -> dict:
    """Median seconds of the three contractions of ``factors`` random factors with the training batch."""
    import jax

    key = jax.random.key(1)
    f = jax.tree.map(lambda a: jax.random.normal(key, (factors, *a.shape), a.dtype), params)
    times = {}
    for method in METHODS:
        kernel = jax.jit(lambda p, fa, b, m=method: contract(loss_fn, p, fa, b, m))
        timing, _ = common.time_call(lambda k=kernel: k(params, f, batch), repeats)
        times[method] = timing.median
    return times


def pick_rows(repeats: int, scale_factor: float = 1.0, cases: list[int] | None = None) -> list[dict]:
    sys.path.insert(0, HERE)
    import common

    from jaxinf.scoring import choose_method, contract, layer_profile

    def shrink(v, lo=2):
        return max(lo, int(v * scale_factor))

    rows = []
    for kind, shape, batch, factors in [PICK_CASES[i] for i in cases] if cases else PICK_CASES:
        batch = shrink(batch)
        factors = shrink(factors, 1) if factors > 1 else 1
        if kind == "mlp":
            widths = tuple(shrink(w) for w in shape)
            problem = common.mlp_problem(
                batch, 1, d_in=D_IN if scale_factor >= 1 else 4, widths=widths, classes=CLASSES, train_steps=1
            )
            loss_fn, params, data, p = problem.loss_fn, problem.params, problem.train, problem.num_params
            label = "mlp " + "x".join(map(str, widths))
        else:
            side, channels = shrink(shape[0], 4), shrink(shape[1])
            loss_fn, params, data = cnn_problem(side, channels, batch)
            p = sum(int(a.size) for a in __import__("jax").tree.leaves(params))
            label = f"cnn {side}x{side}x3, {channels} ch"
        times = _time_methods(common, contract, loss_fn, params, data, factors, repeats)
        pick = choose_method(factors, batch, p, layer_profile(loss_fn, params, data))
        fastest = min(times, key=times.get)
        rows.append(
            {
                "model": label,
                "P": p,
                "batch": batch,
                "factors": factors,
                **{f"{m}_ms": 1e3 * times[m] for m in METHODS},
                "pick": pick,
                "fastest": fastest,
                "pick_is_fastest": pick == fastest,
                "pick_over_best": times[pick] / times[fastest],
            }
        )
    return rows


# ----------------------------------------------------------------------------


def _logged(runner):
    """``runner`` that prints each row it returns and the wall time it took, as it goes."""

    def run(spec: dict) -> dict:
        start = time.perf_counter()
        row = runner(spec)
        took = time.perf_counter() - start
        print(f"{spec['tag']} N={spec['n']} devices={spec['devices']}: {took:.1f} s", row, flush=True)
        return row

    return run


QUICK = dict(
    sizes=[2000], devices_n=2000, devices=[8], n_test=10, batch=256, widths=[4], fit_n=256, train_steps=10,
    inline=True, repeats=1, pick_scale=0.05, pick_cases=[0, len(PICK_CASES) - 1],
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    add = parser.add_argument
    add("--sizes", type=float, nargs="+", default=[1e4, 1e5], help="numbers of training points N of the scaling rows")
    add("--large", action="store_true", help="add N = 1e6 to the scaling rows")
    add("--devices-n", type=float, default=1e5, help="N of the devices rows")
    add("--devices", type=int, nargs="+", default=[1, 8], help="simulated host devices of the devices rows")
    add("--n-test", type=int, default=100, help="test points scored against the N training points")
    add("--batch", type=int, default=1024, help="training points per streamed batch")
    add("--widths", type=int, nargs="+", default=[64], help="hidden-layer widths of the tanh MLP (32 inputs)")
    add("--fit-n", type=int, default=4096, help="in-memory points the model is trained and the solver fitted on")
    add("--train-steps", type=int, default=200, help="Adam steps training the model")
    add("--repeats", type=int, default=5, help="timed calls after the first, for the pick timings (median)")
    add("--pick-scale", type=float, default=1.0, help="factor shrinking the pick cases' batches, widths and factors")
    add(
        "--pick-cases",
        type=int,
        nargs="+",
        choices=range(len(PICK_CASES)),
        metavar="I",
        help="indices into PICK_CASES of the pick rows (default: all)",
    )
    add("--only", choices=["scaling", "devices", "pick"], nargs="+", help="tables to make (default: all three)")
    add("--inline", action="store_true", help="run the scaling rows in this process, not a fresh one each")
    add("--child", help=argparse.SUPPRESS)
    cli.add_quick(
        parser,
        "N=2000, 10 test points, batches of 256, a 32-4-10 MLP, scaling rows inline, 8 devices only, "
        "2 pick cases at 5%%",
    )
    return parser


def main(argv=None) -> dict:
    args = cli.parse(build_parser(), argv, QUICK)
    if args.child:
        spec = json.loads(args.child)
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec['devices']}"  # before JAX starts
        print(json.dumps(child(spec)))
        return {}
    sys.path.insert(0, HERE)
    import common

    parts = set(args.only or ["scaling", "devices", "pick"])
    sizes = sorted({int(n) for n in args.sizes} | ({10**6} if args.large else set()))
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        need = max(sizes + [int(args.devices_n)])
        if parts & {"scaling", "devices"}:
            write_data(tmp, need)
        base = {
            "data": tmp,
            "store": tmp,
            "batch": args.batch,
            "n_test": args.n_test,
            "widths": args.widths,
            "fit_n": args.fit_n,
            "train_steps": args.train_steps,
        }
        if "scaling" in parts:
            runner = _logged(child if args.inline else run_child)
            results["scaling"] = [
                runner({**base, "n": n, "devices": 1, "floor": True, "tag": "scaling"}) for n in sizes
            ]
            first = results["scaling"][0]
            for r in results["scaling"]:
                r["time_per_N_vs_first"] = (r["run_s"] / r["N"]) / (first["run_s"] / first["N"])
        if "devices" in parts:
            rows = [
                _logged(run_child)({**base, "n": int(args.devices_n), "devices": d, "floor": False, "tag": "devices"})
                for d in args.devices
            ]
            for r in rows:
                r["speedup"] = rows[0]["run_s"] / r["run_s"]
            results["devices"] = rows
    if "pick" in parts:
        print("scoring pick ...", flush=True)
        results["pick"] = pick_rows(args.repeats, args.pick_scale, args.pick_cases)

    tables = []
    meta = {
        "cpu_count": os.cpu_count(),
        "dtype": "float32",
        "solver": "direct",
        "curvature": "gauss_newton",
        "damping": 1e-3,
    }
    if "scaling" in results:
        tables.append(
            common.write_results(
                "scale_scaling",
                results["scaling"],
                [
                    "N",
                    "P",
                    "n_test",
                    "batch",
                    "method",
                    "compile_s",
                    "run_s",
                    "floor_s",
                    "x_floor",
                    "time_per_N_vs_first",
                    "scores_per_s",
                    "peak_mb",
                    "growth_mb",
                    "plan_mb",
                ],
                meta,
            )
        )
    if "devices" in results:
        tables.append(
            common.write_results(
                "scale_devices",
                results["devices"],
                ["N", "devices", "P", "method", "compile_s", "run_s", "speedup", "peak_mb"],
                meta,
            )
        )
    if "pick" in results:
        tables.append(
            common.write_results(
                "scale_pick",
                results["pick"],
                [
                    "model",
                    "P",
                    "batch",
                    "factors",
                    "gradients_ms",
                    "jvp_ms",
                    "layerwise_ms",
                    "pick",
                    "fastest",
                    "pick_is_fastest",
                    "pick_over_best",
                ],
                meta,
            )
        )
    folder = common.results_dir()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "scale.json"), "w") as f:
        payload = {"machine": common.machine(), "quick": cli.QUICK, "meta": meta, **results}
        json.dump(payload, f, indent=2, default=float)
    with open(os.path.join(folder, "scale.md"), "w") as f:
        f.write((cli.BANNER + "\n\n" if cli.QUICK else "") + "\n\n".join(tables) + "\n")
    print(
        f"{common.machine()}; float32, direct solver, Gauss-Newton, damping 1e-3; {os.cpu_count()} physical cores "
        "(8 simulated devices share them)\n"
    )
    print("\n\n".join(tables))
    return results


if __name__ == "__main__":
    main()
