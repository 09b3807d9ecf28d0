"""Every example in examples/ runs as a user would run it (a fresh process, float32 defaults), and the README's
worked example is the file examples/flax_nnx.py itself.

The README's example runs alone, exactly as ``python flax_nnx.py``; the other examples run one after another in
ONE fresh process (each as ``__main__`` via :func:`runpy.run_path`, from the examples folder, like ``python
name.py``), which saves a JAX/Flax start-up per script. Each still has its own test and its own output check.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
README = EXAMPLES.parent / "README.md"
NEEDS = {"flax_nnx": "flax", "flax_linen_batchnorm": "flax", "equinox_mlp": "equinox", "haiku_mlp": "haiku",
         "raw_jax": "jax"}  # fmt: skip
SHARED = ["flax_linen_batchnorm", "equinox_mlp", "haiku_mlp", "raw_jax"]  # run in one process
MARK = "=== example: "
# Runs each named example as __main__ with argv, sys.path[0] and cwd as `python name.py` would set them.
DRIVER = f"""
import runpy, sys
for name in sys.argv[1:]:
    print({MARK!r} + name, flush=True)
    sys.argv = [name + ".py"]
    sys.path.insert(0, "")
    runpy.run_path(name + ".py", run_name="__main__")
    sys.path.pop(0)
    sys.stdout.flush()
"""


def _env():
    return {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}


@pytest.fixture(scope="module")
def shared_run():
    """One fresh process running every installed example of SHARED in turn; its output split per example."""
    names = [n for n in SHARED if importlib.util.find_spec(NEEDS[n]) is not None]
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, *names], cwd=EXAMPLES, env=_env(), capture_output=True, text=True, timeout=900
    )
    sections = dict(part.split("\n", 1) for part in done.stdout.split(MARK)[1:])
    return done, sections


def _check(name, returncode, stdout, stderr):
    assert returncode == 0, f"{name}: {stderr[-3000:]}"
    assert re.search(r"influences \(20, 300\)", stdout), f"{name}: {stdout}"


@pytest.mark.parametrize("name", SHARED)
def test_example_runs(name, shared_run):
    pytest.importorskip(NEEDS[name])
    done, sections = shared_run
    assert name in sections, f"{name} did not start: an earlier example failed\n{done.stderr[-3000:]}"
    last = name == list(sections)[-1]  # the example that was running when the process ended
    _check(name, done.returncode if last else 0, sections[name], done.stderr)


def test_readme_example_runs_as_a_script():
    pytest.importorskip("flax")
    done = subprocess.run(
        [sys.executable, "flax_nnx.py"], cwd=EXAMPLES, env=_env(), capture_output=True, text=True, timeout=600
    )
    _check("flax_nnx", done.returncode, done.stdout, done.stderr)


def test_readme_example_is_the_executed_file():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    source = (EXAMPLES / "flax_nnx.py").read_text()

    assert any(block.strip() == source.strip() for block in blocks), "README example != examples/flax_nnx.py"
