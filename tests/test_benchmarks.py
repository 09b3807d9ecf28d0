"""Benchmark scripts run end to end at tiny sizes (no timing is asserted)."""

import importlib.util
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def _load(name):
    sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
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
