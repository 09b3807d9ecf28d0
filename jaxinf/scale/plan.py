"""The memory and disk plan of a tiled influence computation, read from XLA's compiled memory analysis.

Memory, per device, with ``T = test_block``, ``B`` the training batch size
(rounded up to a multiple of the devices), ``p`` parameters, ``s`` bytes per
float:

* factors: the solver state, plus ``2 T p s`` (test gradients and factors)
  and the solver's workspace for ``T`` right-hand sides;
* scoring with ``"gradients"``: ``B p s`` of per-example gradients (split
  over the devices) plus ``T p s`` of factors and ``T B s`` of scores;
* scoring with ``"jvp"``: ``T`` forward-mode passes over the batch at once
  (``T ×`` the activations of ``B`` examples), no per-example gradients;
* scoring with ``"layerwise"``: the layer inputs and output gradients of
  ``B`` examples, plus per layer either ``T B`` outputs per location (direct
  contraction) or the ``B`` per-example gradients of that one layer;
* host: one training batch, one result block ``T B s`` (twice while it is
  encoded) and one test block.

None of it grows with the number of training points. The exact figures are
read from XLA's compiled memory analysis of the two kernels before any work
is done (:meth:`InfluenceCalculator.plan`); a configuration that does not fit
in ``max_memory`` (default: the free memory) or a result larger than the
free disk space is refused with the numbers and what to lower.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.memory import available_bytes

__all__ = ["MemoryPlan", "compiled_peak_bytes", "format_bytes", "plan_memory", "tree_bytes"]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What one configuration of the calculator needs.

    Attributes:
      test_block, train_batch: block sizes (train batch padded to the devices).
      method: the scoring contraction (``"gradients"``, ``"jvp"``, ``"layerwise"`` or
        ``"perturbation"``).
      num_params: ``p``.
      devices: devices in the mesh (``local_devices`` on this host).
      factors_bytes: peak bytes per device of the factor kernel (state,
        test gradients, solver workspace, factors).
      scoring_bytes: peak bytes per device of the scoring kernel.
      host_bytes: host buffers (a training batch, a result block, a test block).
      disk_bytes: size of the full result on disk (uncompressed).
      budget_bytes: per-device budget the plan was checked against.
      shared_host_memory: the devices are host (CPU) devices, so their memory
        and the host buffers share the host RAM.
    """

    test_block: int
    train_batch: int
    method: str
    num_params: int
    devices: int
    local_devices: int
    factors_bytes: int
    scoring_bytes: int
    host_bytes: int
    disk_bytes: int
    budget_bytes: int
    shared_host_memory: bool

    @property
    def device_bytes(self) -> int:
        """Peak per device: the larger of the two kernels (they do not run at once)."""
        return max(self.factors_bytes, self.scoring_bytes)

    @property
    def total_bytes(self) -> int:
        """What this host needs when devices share its memory (CPU), else the per-device peak."""
        if self.shared_host_memory:
            return self.device_bytes * self.local_devices + self.host_bytes
        return self.device_bytes

    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def check(self) -> None:
        """Raise ``ValueError`` with this plan and what to lower unless it :meth:`fits`."""
        if not self.fits():
            raise ValueError(
                "This influence computation does not fit in memory:\n"
                f"{self}\n"
                "Lower test_block (factor kernel) or the training batch size (scoring kernel), use "
                "scoring='jvp' for few test points, shard over more devices, or raise max_memory if you know it fits."
            )

    def __str__(self) -> str:
        rows = [
            ("test block × train batch", f"{self.test_block} × {self.train_batch}"),
            ("scoring, parameters", f"{self.method}, p = {self.num_params}"),
            ("devices (this host)", f"{self.devices} ({self.local_devices})"),
            ("factor kernel / device", format_bytes(self.factors_bytes)),
            ("scoring kernel / device", format_bytes(self.scoring_bytes)),
            ("host buffers", format_bytes(self.host_bytes)),
            ("needed" + (" (host RAM)" if self.shared_host_memory else " / device"), format_bytes(self.total_bytes)),
            ("budget", format_bytes(self.budget_bytes)),
            ("result on disk", format_bytes(self.disk_bytes)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def compiled_peak_bytes(compiled, fallback: int) -> int:
    """Peak bytes of a compiled program (arguments + outputs + temporaries - aliases), or ``fallback``
    on a backend that has no memory analysis."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # pragma: no cover - backend without analysis
        stats = None
    if stats is None:
        return fallback
    return int(
        stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    )


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of ``tree`` (arrays, ``ShapeDtypeStruct``, PRNG keys, Python scalars)."""
    return sum(int(np.prod(np.shape(x))) * _itemsize(x) for x in jax.tree.leaves(tree))


def _itemsize(x) -> int:
    dtype = getattr(x, "dtype", None)
    if dtype is None:  # a Python scalar
        return np.asarray(x).dtype.itemsize
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # key<impl>: the bytes of its key data
        return dtype.itemsize
    return jnp.dtype(dtype).itemsize


def plan_memory(calc, test_source, train_source):
    """The :class:`MemoryPlan` of calculator ``calc`` on these sources, and its layout and compiled kernels."""
    tb_pad, b_local_pad, test_like, train_like, leaf, x_shape = calc._layout(test_source, train_source)
    method = calc._method(train_like)
    train_like_size = jax.tree.leaves(train_like)[0].shape[0]
    f_compiled, s_compiled = calc._kernels(test_like, train_like, method, leaf)
    p = calc.spec.size
    itemsize = jnp.dtype(calc.spec.dtype).itemsize
    per_dev_rows = train_like_size // calc.devices
    fallback_f = tree_bytes(calc.state) + 2 * tb_pad * p * itemsize
    fallback_s = tb_pad * p * itemsize + (per_dev_rows * p * itemsize if method in ("gradients", "layerwise") else 0)
    out_cells = tb_pad * b_local_pad * int(np.prod(x_shape, dtype=np.int64))
    batch_bytes = tree_bytes(train_like) // max(1, calc.devices // calc.local_devices)
    host = batch_bytes + 2 * out_cells * itemsize + tree_bytes(test_like)
    n_test, n_train = test_source.total_examples, train_source.total_examples
    disk = n_test * n_train * int(np.prod(x_shape, dtype=np.int64)) * itemsize
    device = calc.mesh.local_mesh.devices.flat[0]
    budget = available_bytes(device) if calc.max_memory is None else int(calc.max_memory)
    plan = MemoryPlan(
        test_block=tb_pad,
        train_batch=train_like_size,
        method=method,
        num_params=p,
        devices=calc.devices,
        local_devices=calc.local_devices,
        factors_bytes=compiled_peak_bytes(f_compiled, fallback_f),
        scoring_bytes=compiled_peak_bytes(s_compiled, fallback_s),
        host_bytes=host,
        disk_bytes=disk,
        budget_bytes=budget,
        shared_host_memory=device.platform == "cpu",
    )
    return plan, (tb_pad, b_local_pad, test_like, train_like, leaf, x_shape, method, f_compiled, s_compiled)
