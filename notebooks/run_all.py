"""Execute every notebook in this folder at small size; fail loudly on the first error.

    python notebooks/run_all.py                 # what CI runs: small sizes, outputs discarded
    python notebooks/run_all.py --inplace       # also write the outputs (plots) back into the notebooks
    python notebooks/run_all.py 01_quickstart   # only the notebooks whose name contains this

Sizes: each notebook reads ``JAXINF_NOTEBOOK_SMALL`` in its first cell; this
script sets it to ``1`` unless ``--full`` is given. Every cell has a time limit
(``--cell-timeout`` seconds); an error or a timeout in any cell stops that
notebook, prints the failing cell and its traceback, and makes the script exit
with status 1 after the other notebooks have run.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run_one(path: str, *, timeout: int, inplace: bool) -> float:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": HERE}}, allow_errors=False
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    if inplace:
        nbformat.write(nb, path)
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only notebooks whose file name contains one of these")
    parser.add_argument("--inplace", action="store_true", help="write the executed notebooks back")
    parser.add_argument("--full", action="store_true", help="full sizes (JAXINF_NOTEBOOK_SMALL unset)")
    parser.add_argument("--cell-timeout", type=int, default=900, help="seconds per cell (a hang fails CI in 15 min)")
    args = parser.parse_args(argv)
    if args.full:
        os.environ.pop("JAXINF_NOTEBOOK_SMALL", None)
    else:
        os.environ["JAXINF_NOTEBOOK_SMALL"] = "1"
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    paths = sorted(glob.glob(os.path.join(HERE, "[0-9][0-9]_*.ipynb")))
    if args.names:
        paths = [p for p in paths if any(n in os.path.basename(p) for n in args.names)]
    if not paths:
        print("no notebooks matched", file=sys.stderr)
        return 1
    failed = []
    for path in paths:
        name = os.path.basename(path)
        print(f"running {name} ...", flush=True)
        try:
            seconds = run_one(path, timeout=args.cell_timeout, inplace=args.inplace)
        except Exception as e:  # CellExecutionError, CellTimeoutError, DeadKernelError
            failed.append(name)
            print(f"FAILED {name}: {type(e).__name__}\n{e}", file=sys.stderr, flush=True)
            continue
        print(f"ok {name} ({seconds:.1f} s)", flush=True)
    if failed:
        print(f"{len(failed)} of {len(paths)} notebooks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(paths)} notebooks ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
