"""Run a test worker module as two (or more) processes on loopback, as ``jax.distributed`` jobs run.

A worker module defines ``main(process_id, num_processes, port, out_dir)`` and ends with
``if __name__ == "__main__": worker_main(main)``; a test calls ``run_workers("tests._x_worker", tmp_path)``,
which waits for every process and fails with the tail of a failed process's log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(module: str, out_dir, *, count: int = 2, timeout: float = 240) -> list[str]:
    """Start ``python -m module k count port out_dir`` for ``k < count`` and wait; return their logs."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the worker sets its own devices
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, str(k), str(count), str(port), str(out_dir)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in range(count)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for k, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {k} failed:\n{log[-4000:]}"
    return logs


def worker_main(main, *, devices: int = 2) -> None:
    """A worker's entry: ``devices`` CPU devices (flags read when the backend starts), float64, then ``main``."""
    fast = " --xla_backend_optimization_level=0" if os.environ.get("JAXINF_TEST_FAST_COMPILE") else ""  # as conftest
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" + fast
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax.config.update("jax_enable_x64", True)
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
