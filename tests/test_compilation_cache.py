"""``jaxinf.enable_compilation_cache``: a second process reads the compiled programs of the first from disk."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import jaxinf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Counts JAX's persistent-cache hits (jax.monitoring events) while fitting and scoring a tiny model.
PROBE = """
import sys, jax, jax.numpy as jnp
from jax import monitoring
hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
import jaxinf
print(jaxinf.enable_compilation_cache(sys.argv[1]))
x = jnp.linspace(-1.0, 1.0, 8)
loss = lambda w, b: jnp.mean((w * b - 1.0) ** 2)
jaxinf.InfluenceModel(loss, jnp.array(0.5), jaxinf.direct(), damping=0.1).fit(x).influences(x[:2], x)
print(len(hits))
"""


def _run(folder) -> tuple[str, int]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)  # one device, as a user's process
    command = [sys.executable, "-c", PROBE, str(folder)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    used, hits = out.stdout.split()
    return used, int(hits)


@pytest.mark.multiprocess
def test_a_second_process_reads_the_compiled_programs_from_disk(tmp_path):
    folder = tmp_path / "xla"
    used, hits = _run(folder)
    assert used == str(folder) and hits == 0
    written = len(os.listdir(folder))
    assert written > 0  # every program of the fit and the scores, however small
    _, hits = _run(folder)
    assert hits >= written  # the second process compiled nothing that the first had compiled
    assert len(os.listdir(folder)) == written


def test_a_file_in_the_way_is_refused(tmp_path):
    path = tmp_path / "not_a_folder"
    path.write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        jaxinf.enable_compilation_cache(path)
