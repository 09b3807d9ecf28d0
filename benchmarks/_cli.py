"""Command-line helpers shared by the benchmark scripts: help formatting and the ``--quick`` smoke-test mode.

Importing this module imports only ``argparse``, ``os`` and ``sys`` (no JAX),
so a script can parse its arguments before JAX starts (``bench_scale.py`` sets
the number of simulated devices in ``XLA_FLAGS`` first).

``--quick`` replaces the defaults of a script with a smoke-test configuration
(tiny sizes, one repeat, fewer configurations per method family) that runs
the same code paths in under a minute on an idle 2-core CPU; flags given
explicitly on the command line still win. At toy sizes compilation is most of
the time, so a quick run also turns most of XLA's optimisations off
(``jax_disable_most_optimizations``, in this process and in the child
processes it starts), which roughly halves it. A quick run prints
:data:`BANNER` first and writes its results under
``benchmarks/results/quick/`` (``common.results_dir()``), so it never
overwrites the results of a full run.
"""

from __future__ import annotations

import argparse
import os
import sys

QUICK = False  # set by parse(): True while the current run is a --quick run
BANNER = (
    "QUICK RUN (--quick): a smoke test at toy sizes, one repeat, XLA optimisations off; its timings and "
    "accuracies are NOT representative. Results go to benchmarks/results/quick/."
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends ``(default: ...)`` to every option that has a default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == "" or default is argparse.SUPPRESS
        if unset or "%(default)" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose description is the script's module docstring ``doc``."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def add_quick(p: argparse.ArgumentParser, what: str) -> None:
    """Add ``--quick``; ``what`` says what the quick run shrinks (for its help text)."""
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test in under a minute on 2 CPU cores: {what}; explicit flags still win; prints a banner and "
        "writes under benchmarks/results/quick/ (never over a full run's results)",
    )


def parse(p: argparse.ArgumentParser, argv, quick: dict) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick``, again with ``quick`` as the defaults, then print :data:`BANNER`."""
    global QUICK
    args = p.parse_args(argv)
    QUICK = bool(getattr(args, "quick", False))
    if QUICK:
        unknown = set(quick) - {a.dest for a in p._actions}
        if unknown:
            raise ValueError(f"quick defaults for options the parser does not have: {sorted(unknown)}")
        p.set_defaults(**quick)
        args = p.parse_args(argv)
        print(BANNER, flush=True)
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # read when JAX is imported (here or in a child)
        if "jax" in sys.modules:
            sys.modules["jax"].config.update("jax_disable_most_optimizations", True)
    return args
