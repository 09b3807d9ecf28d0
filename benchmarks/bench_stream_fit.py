"""EK-FAC fitted from a stream against the in-memory fit: wall time and peak memory against N.

    python benchmarks/bench_stream_fit.py            # N = 1e4, 1e5
    python benchmarks/bench_stream_fit.py --large    # adds N = 1e6

A tanh MLP classifier (``--widths``, default 128-128 on 32 inputs and 10
classes: about 22k parameters, trained briefly with ``common.mlp_problem``),
EK-FAC with the sampled Fisher (categorical likelihood, as kronfluence does),
float32. The training set (``x`` float32 ``N × 32``, ``y`` int32) is written
to raw files once per N. Every row runs in a fresh process, so its peak RSS
is its own:

* ``stream``: :func:`jaxinf.scale.fit_from_stream` over an
  :class:`~jaxinf.scale.ArraySource` of memory-mapped arrays. Each batch maps
  only its own rows (``np.memmap`` with an offset), copies them and unmaps,
  so the resident memory stays one batch (a memmap of the whole file would
  keep every page read resident, and count it).
* ``memory``: the whole file read into memory, then ``solver.init`` on
  ``jaxinf.curvature_operator`` of the same batches (one jitted sweep).

Columns: ``fit_s`` (wall time of the fit, compilation included: the streamed
fit compiles its per-batch kernels on every call), ``warm_s`` (``stream``:
the same fit on the first two batches, i.e. mostly compilation;
``memory``: the second call of the already compiled init), ``peak_mb``
(process peak RSS from just before reading the data to the end of the fit),
``growth_mb`` (peak minus the RSS before), ``data_mb`` (size of the data)
and ``max_rel_diff`` (largest relative difference of the EK-FAC eigenvalues
between the two fits at that N: same batches, same draws).

Writes ``benchmarks/results/stream_fit.json`` and ``stream_fit.md``
(``--quick``: a smoke test at toy sizes, under ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _cli as cli  # noqa: E402  (argparse only)
from bench_scale import CLASSES, D_IN, _reset_peak, _rss_mb, write_data  # noqa: E402  (the same data and RSS probes)
from bench_scale import run_child as scale_child  # noqa: E402


class MappedRows:
    """A read-only ``(n, *shape)`` array in a raw file; slicing maps only the rows asked for and copies them."""

    def __init__(self, path: str, dtype, n: int, shape: tuple = ()):
        import numpy as np

        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), tuple(shape)
        self.shape = (n, *shape)
        self.ndim = len(self.shape)
        self.row_bytes = self.dtype.itemsize * int(np.prod(shape, dtype=np.int64))

    def __getitem__(self, index: slice):
        import numpy as np

        start, stop, _ = index.indices(self.shape[0])
        mapped = np.memmap(
            self.path, self.dtype, mode="r", offset=start * self.row_bytes, shape=(stop - start, *self.row_shape)
        )
        rows = np.array(mapped)
        del mapped  # unmapped: the pages read do not stay resident
        return rows


def child(args: dict) -> dict:
    import common
    import jax
    import numpy as np

    import jaxinf
    from jaxinf import scale

    n, batch, data = args["n"], args["batch"], args["data"]
    problem = common.mlp_problem(
        args["fit_n"], 10, d_in=D_IN, widths=tuple(args["widths"]), classes=CLASSES, train_steps=args["train_steps"]
    )
    solver = jaxinf.ekfac(fisher="sampled", likelihood="categorical")
    key = jax.random.key(0)
    common_kw = dict(kind="gauss_newton", damping=1e-3, model_fn=problem.model_fn, output_loss=problem.output_loss)
    x_path, y_path = os.path.join(data, "x.f32"), os.path.join(data, "y.i32")
    row = {"N": n, "mode": args["mode"], "P": problem.num_params, "batch": batch}
    jax.block_until_ready(problem.params)

    if args["mode"] == "stream":

        def source(count):
            return scale.ArraySource(
                (MappedRows(x_path, np.float32, n, (D_IN,)), MappedRows(y_path, np.int32, n)), batch, stop=count
            )

        def fit(count):
            return scale.fit_from_stream(
                solver, problem.loss_fn, problem.params, source(count), key=key, progress=False, **common_kw
            )

        start = time.perf_counter()
        jax.block_until_ready(fit(min(n, 2 * batch)))
        row["warm_s"] = time.perf_counter() - start
        before = _rss_mb("VmRSS")
        reset = _reset_peak()
        start = time.perf_counter()
        state = jax.block_until_ready(fit(n))
        row["fit_s"] = time.perf_counter() - start
    else:
        before = _rss_mb("VmRSS")
        reset = _reset_peak()
        start = time.perf_counter()
        x = np.fromfile(x_path, np.float32).reshape(n, D_IN)
        y = np.fromfile(y_path, np.int32)
        batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
        operator = jaxinf.curvature_operator(problem.loss_fn, problem.params, batches, **common_kw)
        del x, y, batches
        init = jax.jit(lambda op, k: solver.init(op, key=k))
        state = jax.block_until_ready(init(operator, key))
        row["fit_s"] = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(init(operator, key))
        row["warm_s"] = time.perf_counter() - start
    peak = _rss_mb("VmHWM") if reset else float("nan")
    row.update(peak_mb=peak, growth_mb=peak - before, data_mb=n * (D_IN + 1) * 4 / 2**20)
    np.savez(os.path.join(args["out"], f"{args['mode']}-{n}.npz"), *[np.asarray(v) for v in state.eigvals])
    return row


def run_child(args: dict) -> dict:
    return scale_child(args, __file__)


def max_rel_diff(out: str, n: int) -> float:
    import numpy as np

    a, b = np.load(os.path.join(out, f"stream-{n}.npz")), np.load(os.path.join(out, f"memory-{n}.npz"))
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k]))) for k in a.files)


QUICK = dict(sizes=[2000], batch=256, widths=[16, 16], fit_n=256, train_steps=10, inline=True)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    add = parser.add_argument
    add("--sizes", type=float, nargs="+", default=[1e4, 1e5], help="numbers of training points N (one row per mode)")
    add("--large", action="store_true", help="add N = 1e6")
    add("--batch", type=int, default=1024, help="training points per batch (streamed and in memory)")
    add("--widths", type=int, nargs="+", default=[128, 128], help="hidden-layer widths of the tanh MLP (32 inputs)")
    add(
        "--modes",
        nargs="+",
        choices=["stream", "memory"],
        default=["stream", "memory"],
        help="fits to run: streamed from disk and/or in memory (both: their eigenvalues are compared)",
    )
    add("--fit-n", type=int, default=4096, help="points the model is trained on")
    add("--train-steps", type=int, default=200, help="Adam steps training the model")
    add("--inline", action="store_true", help="run the rows in this process, not a fresh one each (smoke tests)")
    add("--child", help=argparse.SUPPRESS)
    cli.add_quick(parser, "N=2000, batches of 256, a 32-16-16-10 MLP, rows inline")
    return parser


def main(argv=None) -> list[dict]:
    args = cli.parse(build_parser(), argv, QUICK)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return []
    import common

    sizes = sorted({int(s) for s in args.sizes} | ({10**6} if args.large else set()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            data = os.path.join(tmp, f"n{n}")
            os.makedirs(data)
            write_data(data, n)
            for mode in args.modes:
                spec = {
                    "n": n,
                    "batch": args.batch,
                    "mode": mode,
                    "data": data,
                    "out": tmp,
                    "widths": args.widths,
                    "fit_n": args.fit_n,
                    "train_steps": args.train_steps,
                }
                row = child(spec) if args.inline else run_child(spec)
                rows.append(row)
                print(json.dumps(row), flush=True)
            if len(args.modes) == 2:
                diff = max_rel_diff(tmp, n)
                for r in rows[-2:]:
                    r["max_rel_diff"] = diff
    columns = ["N", "mode", "P", "batch", "fit_s", "warm_s", "peak_mb", "growth_mb", "data_mb", "max_rel_diff"]
    meta = {"solver": "ekfac(fisher='sampled', likelihood='categorical')", "dtype": "float32", "devices": 1}
    print(common.write_results("stream_fit", rows, columns, meta))
    return rows


if __name__ == "__main__":
    main()
