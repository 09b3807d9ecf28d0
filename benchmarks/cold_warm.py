"""First calls: cold (a fresh process) against warm (the second call), per solver, with and without the disk cache.

    python benchmarks/cold_warm.py --modes cold                       # every solver, MLP and CNN, no disk cache
    python benchmarks/cold_warm.py --models mlp --solvers direct cg ekfac --modes disk --name cold_warm_disk
    python benchmarks/cold_warm.py --quick                            # smoke test: MLP, two solvers, toy sizes

One fresh process per row and mode (``disk``: two), so a run is long: on a
2-core machine shared with other jobs (load average 9-10) the MLP's nine rows
of ``--modes cold`` took 7 minutes, nearly all of it compilation.

For each model and solver, fresh Python processes (``subprocess``) each time
``InfluenceModel(...).fit(train)`` followed by ``influences(test, train)``,
with the training data given as a list of batches of ``--batch-size`` whose
last batch is ragged (1,000 examples in batches of 64: the last has 40):

* ``cold``: the first call in a fresh process, without JAX's persistent
  compilation cache: tracing, lowering and XLA compilation of every program,
  plus the work;
* ``warm``: the second call in the same process, by a *new* ``InfluenceModel``
  of the same loss, solver and shapes (a user's loop: a model per damping,
  per checkpoint): it reuses every compiled program (``jaxinf.solvers.compiled``);
* ``disk``: the first call in a fresh process with
  ``jaxinf.enable_compilation_cache(folder)`` whose folder a previous process
  (``fill``, its first call timed too) has filled: tracing and lowering
  remain, XLA compilation is read back from disk.

Each process also counts XLA compilations and splits the cold time with JAX's
monitoring events (``/jax/core/compile/jaxpr_trace_duration``,
``/jax/core/compile/jaxpr_to_mlir_module_duration``, ``/jax/core/compile/backend_compile_duration``; with
the disk cache the last is the time to read a program back), and names the
programs that took longest to compile.

Models (float32, Gauss-Newton curvature; DataInf: the empirical Fisher, its
closed form): the digits-sized MLP 64 → 32 → 10 (tanh, P = 2,410) and a small
CNN (8×8×2 images, two 3×3 convolutions of 6 channels, P = 994), with random
(untrained) parameters: compile and work do not depend on the values.

Prints a table and writes ``benchmarks/results/cold_warm.json`` (and ``.md``;
``--quick`` under ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli as cli  # noqa: E402

SOLVERS = ("direct", "cg", "cg+kfac", "lissa", "arnoldi", "nystrom", "kfac", "ekfac", "datainf")
MODELS = ("mlp", "cnn")
MODES = ("cold", "disk")
QUICK = {"models": ["mlp"], "solvers": ["direct", "ekfac"], "n_train": 100, "n_test": 5, "batch_size": 32}
EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_s",
}


# ----------------------------------------------------------------------------------------- the child process
def _problem(name: str, n: int):
    """``(loss_fn, model_fn, output_loss, params, x, y)`` for ``n`` examples: random data and parameters."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.tanh(nn.Dense(32)(x)))

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Conv(6, (3, 3), padding="SAME")(x))
            x = nn.tanh(nn.Conv(6, (3, 3), strides=2, padding="VALID")(x))
            return nn.Dense(10)(x.reshape((x.shape[0], -1)))

    rng = np.random.default_rng(0)
    shape = (n, 64) if name == "mlp" else (n, 8, 8, 2)
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    module = MLP() if name == "mlp" else CNN()
    params = module.init(jax.random.key(1), jnp.asarray(x[:1]))

    def model_fn(p, batch):
        return module.apply(p, batch[0])

    def output_loss(logits, batch):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))

    def loss_fn(p, batch):
        return output_loss(model_fn(p, batch), batch)

    return loss_fn, model_fn, output_loss, params, x, y


def _solver(name: str):
    """The solver at its defaults (cheap ranks and iteration counts where a default is not set)."""
    import jaxinf

    made = {
        "direct": lambda: jaxinf.direct(),
        "cg": lambda: jaxinf.cg(rtol=1e-4),
        "cg+kfac": lambda: jaxinf.cg(rtol=1e-4, preconditioner=jaxinf.kfac_preconditioner()),
        "lissa": lambda: jaxinf.lissa(maxiter=100),
        "arnoldi": lambda: jaxinf.arnoldi(40),
        "nystrom": lambda: jaxinf.nystrom(40),
        "kfac": lambda: jaxinf.kfac(),
        "ekfac": lambda: jaxinf.ekfac(),
        "datainf": lambda: jaxinf.datainf(),
    }
    return made[name]()


def child(spec: dict) -> dict:
    """One fresh process: the first and the second fit + influences; times, compilations and where they went."""
    import jax
    from jax import monitoring

    import jaxinf

    if spec["cache"]:
        jaxinf.enable_compilation_cache(spec["cache"])
    seen = {"on": False, "compiles": 0, "hits": 0, "programs": {}, **dict.fromkeys(EVENTS.values(), 0.0)}

    def on_duration(event, seconds, **kw):
        if seen["on"] and event in EVENTS:
            seen[EVENTS[event]] += seconds
            if event.endswith("backend_compile_duration"):
                seen["compiles"] += 1
                name = kw.get("fun_name", "?")
                seen["programs"][name] = seen["programs"].get(name, 0.0) + seconds

    def on_event(event, **kw):
        if seen["on"] and event == "/jax/compilation_cache/cache_hits":
            seen["hits"] += 1

    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)
    loss_fn, model_fn, output_loss, params, x, y = _problem(spec["model"], spec["n_train"] + spec["n_test"])
    n, b = spec["n_train"], spec["batch_size"]
    train = [(x[i : min(i + b, n)], y[i : min(i + b, n)]) for i in range(0, n, b)]
    test = (x[n:], y[n:])
    curvature = "fisher" if spec["solver"] == "datainf" else "gauss_newton"
    kw = dict(damping=0.1, curvature=curvature, model_fn=model_fn, output_loss=output_loss, strict=False)

    def once() -> dict:
        for key in ("compiles", "hits", *EVENTS.values()):
            seen[key] = 0 if key in ("compiles", "hits") else 0.0
        seen["programs"] = {}
        seen["on"] = True
        start = time.perf_counter()
        model = jaxinf.InfluenceModel(loss_fn, params, _solver(spec["solver"]), **kw).fit(train)
        jax.block_until_ready(model.state)
        fitted = time.perf_counter()
        jax.block_until_ready(model.influences(test, train))
        end = time.perf_counter()
        seen["on"] = False
        top = sorted(seen["programs"].items(), key=lambda kv: -kv[1])[:3]
        row = {"total_s": end - start, "fit_s": fitted - start, "influences_s": end - fitted}
        row.update({k: seen[k] for k in ("compiles", "hits", *EVENTS.values())})
        return {**row, "top_programs": [f"{k} {v:.2f}s" for k, v in top]}

    first, second = once(), once()
    return {"first": first, "second": second}


# ----------------------------------------------------------------------------------------- the parent
def _run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    # a cache folder set in the environment (the test suite sets one) would make a "cold" child read programs from disk
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (--timeout)"}
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(model: str, solver: str, args) -> dict:
    """Cold and warm without the disk cache; then a filling process and a reading one with it."""
    spec = {"model": model, "solver": solver, "n_train": args.n_train, "n_test": args.n_test}
    spec.update(batch_size=args.batch_size, cache=None)
    row = {"model": model, "solver": solver}
    if "cold" in args.modes:
        got = _run_child(spec, args.timeout)
        if "error" in got:
            return {**row, "error": got["error"]}
        cold, warm = got["first"], got["second"]
        if cold["hits"]:
            return {**row, "error": f"the cold call read {cold['hits']} programs from a disk cache: not a cold call"}
        row.update(cold_s=cold["total_s"], warm_s=warm["total_s"], ratio=cold["total_s"] / warm["total_s"])
        row.update(cold_fit_s=cold["fit_s"], cold_influences_s=cold["influences_s"], warm_fit_s=warm["fit_s"])
        row.update(warm_influences_s=warm["influences_s"], compiles=cold["compiles"], warm_compiles=warm["compiles"])
        row.update(trace_s=cold["trace_s"], lower_s=cold["lower_s"], xla_s=cold["compile_s"])
        row["slowest_compiles"] = "; ".join(cold["top_programs"])
    if "disk" in args.modes:
        with tempfile.TemporaryDirectory(prefix="jaxinf_cold_warm_") as folder:
            filled = _run_child({**spec, "cache": folder}, args.timeout)
            read = _run_child({**spec, "cache": folder}, args.timeout)
        if "error" in filled or "error" in read:
            return {**row, "error": filled.get("error") or read.get("error")}
        first, warm = read["first"], read["second"]
        row.update(fill_s=filled["first"]["total_s"], disk_s=first["total_s"])
        row.update(disk_ratio=first["total_s"] / warm["total_s"], disk_hits=first["hits"])
        row.update(disk_trace_s=first["trace_s"], disk_lower_s=first["lower_s"], disk_read_s=first["compile_s"])
        row.setdefault("warm_s", warm["total_s"])
    return row


COLUMNS = [
    "model", "solver", "cold_s", "warm_s", "ratio", "compiles", "warm_compiles", "trace_s", "lower_s", "xla_s",
    "fill_s", "disk_s", "disk_ratio", "disk_hits", "disk_read_s",
]  # fmt: skip


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to measure")
    p.add_argument("--solvers", nargs="+", choices=SOLVERS, default=list(SOLVERS), help="solvers to measure")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="cold: a fresh process without the disk cache (cold and warm); disk: a process filling "
                   "the persistent compilation cache, then a fresh one reading it")  # fmt: skip
    p.add_argument("--n-train", type=int, default=1000, help="training examples")
    p.add_argument("--n-test", type=int, default=20, help="test examples")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (the last batch is ragged)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed to one child process")
    p.add_argument("--name", default="cold_warm", help="results file name under benchmarks/results/ (no suffix)")
    p.add_argument("--child", help=argparse.SUPPRESS, default=None)  # one measuring process (internal)
    cli.add_quick(p, "the MLP, direct and ekfac, 100 training examples")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    args = cli.parse(build_parser(), argv, QUICK)
    import common

    rows, start = [], time.perf_counter()
    meta = {"n_train": args.n_train, "n_test": args.n_test, "batch_size": args.batch_size, "modes": args.modes}
    for model in args.models:
        for solver in args.solvers:
            row = measure(model, solver, args)
            rows.append(row)
            print(" ".join(f"{c}={common._fmt(row.get(c, ''))}" for c in ["model", "solver", *COLUMNS[2:], "error"]
                           if c in row), flush=True)  # fmt: skip
            meta["wall_s"] = time.perf_counter() - start
            table = common.write_results(args.name, rows, [*COLUMNS, "error"], meta)  # after each row: kept if cut
    print(table)
    print(f"wall time {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
