"""Benchmark scripts run end to end at tiny sizes (no timing is asserted); every flag is documented."""

import argparse
import ast
import importlib.util
import os
import re
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def _load(name):
    sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (flax modules) look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("solver", ["direct"])
def test_bench_influence_runs_and_reports_ratios(solver, tmp_path, monkeypatch):
    bench = _load("bench_influence")
    monkeypatch.setattr(bench.common, "RESULTS", str(tmp_path))
    row = bench.main(
        [
            "--solver",
            solver,
            "--n-train",
            "60",
            "--n-test",
            "4",
            "--d-in",
            "5",
            "--widths",
            "4",
            "--batch-size",
            "25",
            "--repeats",
            "1",
        ]
    )
    assert row["P"] == 5 * 4 + 4 + 4 * 10 + 10
    assert row["floor_s"] > 0 and row["influences_x_floor"] > 0
    assert (tmp_path / f"influence_{solver}.json").exists() and (tmp_path / f"influence_{solver}.md").exists()


SCRIPTS = [
    "bench_influence",
    "bench_iterative",
    "bench_kfac",
    "bench_lowrank",
    "bench_scale",
    "bench_slow_paths",
    "bench_stream_fit",
    "cold_warm",
    "damping",
    "lds_methods",
    "loo",
    "preconditioners",
    "pydvl_compare",
    "suite",
]
OUTSIDE = re.compile(r"\.\./|(?<![\w.])/(?:work|home|tmp|root|usr|mnt)/|~/")  # paths outside the repository


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_documents_every_flag_and_has_quick(name, monkeypatch):
    """``--help`` explains every option, ``--quick`` exists, writes elsewhere, and no docstring leaves the repo."""
    assert sorted(SCRIPTS) == sorted(
        f[:-3] for f in os.listdir(BENCH) if f.endswith(".py") and f not in ("common.py", "_cli.py", "_metrics.py")
    ), "a new benchmark script: add it to SCRIPTS"
    bench = _load(name)
    parser = bench.build_parser()
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    undocumented = ["/".join(a.option_strings) for a in shown if not (a.help or "").strip()]
    assert not undocumented, f"{name}.py: options without help text: {undocumented}"
    assert "--quick" in parser.format_help()  # also: every help string formats (no stray %)
    assert set(bench.QUICK) <= {a.dest for a in parser._actions}, f"{name}.py: QUICK names unknown options"
    common = importlib.import_module("common")
    monkeypatch.setattr(common.cli, "QUICK", True)
    assert common.results_dir() != common.RESULTS  # a quick run never overwrites a full run's results
    for module in (f"{name}.py", "common.py", "_cli.py"):  # the script and the helpers it imports
        with open(os.path.join(BENCH, module)) as f:
            tree = ast.parse(f.read())
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
        for doc in filter(None, map(ast.get_docstring, nodes)):
            assert not OUTSIDE.search(doc), f"{module}: a docstring points outside the repository: {doc[:200]}"
