"""What determines a fitted solver state, recorded in a saved state and compared on load.

A state is a function of the solver (its name and ``Solver.config``) and of
the curvature operator it was fitted on: the curvature kind, the block layout,
each block's damping ``λ_b``, the params, and the loss whose curvature ``C``
is taken (the split ``output_loss(model_fn(θ, z), z)`` for Gauss-Newton). The
params and the loss are recorded as SHA-256 digests
(:mod:`jaxinf.core.fingerprint`); the training data is not recorded.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.fingerprint import loss_digest, tree_digest

PyTree = Any

__all__ = ["state_differences", "state_fingerprint"]


def _host_scalar(x) -> float:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return float(np.asarray(x))


def _example_batch(operator) -> PyTree:
    """Shapes of one example of the operator's data (a batch of one), for the loss's jaxpr."""
    data = operator.data
    if data.stacked is not None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *np.shape(a)[2:]), a.dtype), data.stacked)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *np.shape(a)[1:]), jnp.result_type(a)), data.rest[0])


def _curvature_loss(operator):
    if operator.kind == "gauss_newton":
        model_fn, output_loss = operator.model_fn, operator.output_loss
        return lambda p, b: output_loss(model_fn(p, b), b)
    return operator.loss_fn


def state_fingerprint(solver=None, operator=None) -> dict:
    """What determines a fitted state, as JSON.

    ``{"solver", "solver_config"}`` given ``solver``; ``{"curvature", "blocks", "damping", "params", "loss"}`` given
    ``operator``: the kind, block names and each leaf's block, ``{block: λ}``, SHA-256 digests of the params and of
    the curvature's loss jaxpr on one example.
    """
    out: dict = {}
    if solver is not None:
        out["solver"] = solver.name
        out["solver_config"] = json.loads(json.dumps(solver.config, sort_keys=True)) if solver.config else None
    if operator is not None:
        names = list(operator.block_names)
        per_block = {}
        for leaf, block in enumerate(operator.block_ids):
            per_block.setdefault(names[block], _host_scalar(operator.damping[leaf]))
        out["curvature"] = operator.kind
        out["blocks"] = {"names": names, "of_leaf": list(operator.block_ids)}
        out["damping"] = per_block
        out["params"] = tree_digest(operator.params)
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), operator.params)
        out["loss"] = loss_digest(_curvature_loss(operator), shapes, _example_batch(operator))
    return out


_DESCRIBE = {"solver": "solver", "solver_config": "solver configuration", "curvature": "curvature kind"}
_DESCRIBE |= {"blocks": "block layout", "damping": "damping", "params": "params (digest)", "loss": "loss (digest)"}


def state_differences(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """``(differences, unchecked)``: what differs, and what ``now`` has that the file did not record."""
    diffs, unchecked = [], []
    for key, what in _DESCRIBE.items():
        if key not in now or now[key] is None:
            continue
        if saved.get(key) is None:
            unchecked.append(what)
        elif key == "solver_config" and saved[key] != now[key]:
            changed = sorted(k for k in set(saved[key]) | set(now[key]) if saved[key].get(k) != now[key].get(k))
            parts = [f"{k}: saved {saved[key].get(k)!r}, now {now[key].get(k)!r}" for k in changed]
            diffs.append(f"{what} ({'; '.join(parts)})")
        elif saved[key] != now[key]:
            short = key in ("params", "loss")
            old, new = (saved[key][:12] + "…", now[key][:12] + "…") if short else (saved[key], now[key])
            diffs.append(f"{what}: saved {old!r}, now {new!r}")
    return diffs, unchecked
