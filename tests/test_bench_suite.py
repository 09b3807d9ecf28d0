"""Smoke tests of benchmarks/suite.py and benchmarks/loo.py at tiny sizes (no timing is asserted)."""

import json
import re

import pytest

from tests.test_benchmarks import _load


def test_suite_discovers_every_exported_solver():
    suite = _load("suite")
    found = suite.discover()
    assert {"direct", "cg"} <= set(found)
    ctx = {"P": 30, "N": 100, "damping": 1e-3, "lam_max": 1.0, "dtype": "float32"}
    configs, notes = suite.configurations(ctx)
    families = {c.family.split("+")[0] for c in configs}
    for name in found:  # each factory is run, with a configuration of the suite or its defaults
        labels = [c.label for c in configs]
        assert name in families or any(x.startswith(name) for x in labels + notes), name
    ranks = [int(m.group(1)) for c in configs if (m := re.search(r" r=(\d+)", c.label))]
    assert ranks and max(ranks) <= 30  # ranks capped at P


def test_suite_runs_and_writes_results(tmp_path, monkeypatch):
    suite = _load("suite")
    monkeypatch.setattr(suite.common, "RESULTS", str(tmp_path))
    rows, meta = suite.main(
        [
            "--n-train",
            "40",
            "--n-test",
            "3",
            "--d-in",
            "4",
            "--widths",
            "3",
            "--batch-size",
            "25",
            "--repeats",
            "1",
            "--methods",
            "cg rtol=0.01",
            "--name",
            "tiny",
        ]
    )
    assert [r["method"] for r in rows] == ["cg rtol=0.01"]
    row = rows[0]
    assert "error" not in row, row
    assert row["solve_products"] > 0 and row["total_x_floor"] > 0
    assert row["ihvp_rel_err"] < 0.05 and row["pearson"] > 0.99  # CG to rtol 1e-2 against the float64 reference
    assert row["top10"] >= 0.9 and row["harmful_top10"] >= 0.9 and row["top100"] == 1.0  # k = 100 > N: all of them
    assert meta["P"] == 4 * 3 + 3 + 3 * 10 + 10
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"tiny.{ext}").exists()
    assert json.loads((tmp_path / "tiny.json").read_text())["rows"][0]["method"] == "cg rtol=0.01"


def test_loo_exact_influence_tracks_retraining(tmp_path, monkeypatch):
    loo = _load("loo")
    monkeypatch.setattr(loo.common, "RESULTS", str(tmp_path))
    rows, meta = loo.main(["--n-train", "120", "--n-test", "2", "--k", "30", "--methods", "direct"])
    (row,) = rows
    assert "error" not in row, row
    assert meta["K"] == 30 and meta["max_loo_grad_norm"] < 1e-10
    assert row["pearson"] > 0.9  # Koh & Liang's check: first-order influence predicts leave-one-out retraining
    assert (tmp_path / "loo.json").exists() and (tmp_path / "loo.png").exists()


@pytest.mark.parametrize("bad", [["--methods", "no-such-method"]])
def test_suite_with_no_matching_method_runs_nothing(bad, tmp_path, monkeypatch):
    suite = _load("suite")
    configs, _ = suite.configurations({"P": 10, "N": 10, "damping": 1e-3, "lam_max": 1.0}, bad[1:])
    assert configs == []


def test_pydvl_compare_same_weights_same_answers(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("pydvl.influence.torch")
    cmp = _load("pydvl_compare")
    monkeypatch.setattr(cmp.common, "RESULTS", str(tmp_path))
    rows, meta = cmp.main(
        ["--n-train", "40", "--n-test", "3", "--d-in", "4", "--widths", "3", "--batch-size", "20", "--repeats", "1"]
        + ["--rank", "5", "--damping", "0.1", "--methods", "arnoldi r"]
    )
    assert meta["torch_vs_jax_logits_max_gap"] < 1e-4
    (arn,) = rows  # the same truncated eigenbasis in both libraries: the same (inexact) answer
    assert arn["method"] == "arnoldi r=5" and "jaxinf_error" not in arn and "pydvl_error" not in arn
    assert abs(arn["jaxinf_pearson"] - arn["pydvl_pearson"]) < 1e-3
    assert abs(arn["jaxinf_ihvp_err"] - arn["pydvl_ihvp_err"]) < 1e-3


def test_suite_shows_datainf_and_the_baselines_on_the_same_axes(tmp_path, monkeypatch):
    """DataInf on its empirical Fisher and the gradient-similarity baselines (no curvature) are scored against exact."""
    suite = _load("suite")
    monkeypatch.setattr(suite.common, "RESULTS", str(tmp_path))
    labels = ["datainf (fisher)", "gradient_dot", "gradient_cosine", "tracin (final checkpoint)"]
    args = ["--n-train", "40", "--n-test", "3", "--d-in", "4", "--widths", "3", "--batch-size", "25"]
    rows, _ = suite.main([*args, "--repeats", "1", "--methods", *labels, "--name", "baselines"])
    by = {r["method"]: r for r in rows}
    assert sorted(by) == sorted(labels)
    for row in rows:
        assert "error" not in row, row
        assert -1 <= row["pearson"] <= 1 and -1 <= row["spearman"] <= 1
    assert "ihvp_rel_err" in by["datainf (fisher)"] and "ihvp_rel_err" not in by["gradient_dot"]  # factors or none
    # TracIn at the final checkpoint with η = 1 is the dot product
    assert by["gradient_dot"]["pearson"] == pytest.approx(by["tracin (final checkpoint)"]["pearson"], rel=1e-6)
