"""The main job runs end to end at a small size and writes its figure and summary."""

import json
import os

import pytest

from jaxinf import demo


def test_demo_runs_small_and_writes_outputs(tmp_path, capsys):
    summary = demo.main(
        [
            "--out",
            str(tmp_path),
            "--n-train",
            "150",
            "--n-test",
            "20",
            "--n-flip",
            "5",
            "--hidden",
            "6",
            "--steps",
            "60",
            "--show",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert "most harmful" in out and "flipped labels among" in out and "training loss" in out
    assert os.path.getsize(tmp_path / "influence_demo.png") > 1000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["n_train"] == 150 and saved["num_params"] == 64 * 6 + 6 + 6 * 10 + 10
    assert 0 <= saved["flipped_in_top_self_influence"] <= 5 and 0 <= saved["flipped_in_top_loss"] <= 5
    assert 0 <= saved["flipped_in_top_gradient_norm"] <= 5 and "gradient norm" in out  # the TracIn baseline
    assert summary["figure"] == str(tmp_path / "influence_demo.png")


def test_demo_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="n_train \\+ n_test"):
        demo.main(["--out", str(tmp_path), "--n-train", "1800", "--n-test", "100"])
    with pytest.raises(ValueError, match="n_flip"):
        demo.main(["--out", str(tmp_path), "--n-train", "10", "--n-test", "5", "--n-flip", "11"])
