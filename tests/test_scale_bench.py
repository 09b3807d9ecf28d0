"""benchmarks/bench_scale.py runs end to end at tiny sizes, in this process (no timing is asserted)."""

import importlib.util
import os
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def load_bench(tmp_path, monkeypatch):
    """benchmarks/bench_scale.py as a module, writing its results under ``tmp_path``."""
    sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location("bench_scale", os.path.join(BENCH, "bench_scale.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import common

    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    return bench


def test_bench_scale_smoke(tmp_path, monkeypatch):
    bench = load_bench(tmp_path, monkeypatch)
    argv = "--only scaling --inline --sizes 300 --batch 64 --n-test 5 --widths 4 --fit-n 64 --train-steps 1"
    results = bench.main(argv.split())
    (row,) = results["scaling"]
    assert row["N"] == 300 and row["x_floor"] > 0 and row["method"] in ("gradients", "jvp", "layerwise")
    assert len(bench.PICK_CASES) >= 3
    assert (tmp_path / "scale.json").exists() and (tmp_path / "scale.md").exists()


def test_bench_scale_pick_smoke(tmp_path, monkeypatch):
    bench = load_bench(tmp_path, monkeypatch)
    monkeypatch.setattr(bench, "PICK_CASES", [bench.PICK_CASES[0], bench.PICK_CASES[-1]])
    rows = bench.main("--only pick --repeats 1 --pick-scale 0.05".split())["pick"]
    assert [r["model"].split()[0] for r in rows] == ["mlp", "cnn"]
    for r in rows:
        assert r["pick"] in bench.METHODS and all(r[f"{m}_ms"] > 0 for m in bench.METHODS)
