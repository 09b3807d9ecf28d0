"""The two jitted kernels of the tiled calculator: test factors for a block, and a block of scores."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinf.scale.tiles import shape_key
from jaxinf.scoring import contract, per_example_grads, perturbation
from jaxinf.solvers.base import solve_many

__all__ = ["compile_kernels", "factors_kernel", "scores_kernel"]


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


def compile_kernels(calc, test_like, train_like, method: str, leaf: int | None):
    """The factor and scoring kernels of calculator ``calc``, compiled for these block shapes (cached in ``calc``)."""
    cache_key = (method, leaf, shape_key(test_like), shape_key(train_like))
    if cache_key in calc._compiled:
        return calc._compiled[cache_key]
    loss_fn, solver = calc.model.loss_fn, calc.model.solver
    test_fn = loss_fn if calc.measurement is None else calc.measurement
    f_compiled = factors_kernel.lower(calc.params, calc.state, test_like, loss_fn=test_fn, solver=solver).compile()
    factors_like = jax.eval_shape(
        lambda p, s, b: factors_kernel(p, s, b, loss_fn=test_fn, solver=solver),
        calc.params,
        calc.state,
        test_like,
    )[0]
    replicated = NamedSharding(calc.mesh, P())
    factors_like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), factors_like)
    scores_sharding = NamedSharding(calc.mesh, P(None, calc.mesh.axis_names[0]))
    s_compiled = scores_kernel.lower(
        calc.params, factors_like, train_like, loss_fn=loss_fn, method=method, leaf=leaf, sharding=scores_sharding
    ).compile()
    calc._compiled[cache_key] = (f_compiled, s_compiled)
    return f_compiled, s_compiled
