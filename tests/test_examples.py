"""Every example in examples/ runs as a user would run it (a fresh process, float32 defaults), and the README's
worked example is the file examples/flax_nnx.py itself."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
README = EXAMPLES.parent / "README.md"


@pytest.mark.parametrize("name", ["flax_nnx", "flax_linen_batchnorm", "equinox_mlp", "haiku_mlp", "raw_jax"])
def test_example_runs(name):
    pytest.importorskip({"equinox_mlp": "equinox", "haiku_mlp": "haiku"}.get(name, "flax"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    done = subprocess.run(
        [sys.executable, f"{name}.py"], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"influences \(20, 300\)", done.stdout), done.stdout


def test_readme_example_is_the_executed_file():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    source = (EXAMPLES / "flax_nnx.py").read_text()

    assert any(block.strip() == source.strip() for block in blocks), "README example != examples/flax_nnx.py"
