"""The two jitted kernels of the tiled calculator: test factors for a block, and a block of scores."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinf.scoring import contract, per_example_grads, perturbation
from jaxinf.solvers.base import solve_many

__all__ = ["factors_kernel", "scores_kernel"]


@functools.partial(jax.jit, static_argnames=("loss_fn", "solver"))
def factors_kernel(params, state, batch, *, loss_fn, solver):
    """``(C + λI)⁻¹ ∇θℓ(test_i)`` for a block, the solve infos and a finiteness flag per row."""
    grads = per_example_grads(loss_fn, params, batch)
    factors, info = solve_many(solver, state, grads)
    finite = jnp.stack([jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(factors)]).all(
        axis=0
    )
    return factors, info, finite


@functools.partial(jax.jit, static_argnames=("loss_fn", "method", "leaf", "sharding"))
def scores_kernel(params, factors, batch, *, loss_fn, method, leaf, sharding):
    """The block ``factors_iᵀ ∇θℓ(train_j)`` (or its perturbation), sharded along the training columns."""
    if method == "perturbation":
        out = perturbation(loss_fn, params, factors, batch, leaf)
    else:
        out = contract(loss_fn, params, factors, batch, method)
    return jax.lax.with_sharding_constraint(out, sharding)


# ----------------------------------------------------------------------------
# The calculator
# ----------------------------------------------------------------------------
