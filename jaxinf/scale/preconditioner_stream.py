"""CG pre-conditioners fitted by passes over a stream, equal to their in-memory ``init``.

A :class:`jaxinf.solvers.preconditioners.Preconditioner` is fitted in
``init(operator, key)`` from an operator that holds the data in memory. Over a
stream (:class:`jaxinf.scale.BatchStream`, or the global passes of a
multi-process :func:`jaxinf.scale.fit`) the same states come from passes:

==================================  ===========================================================
``kfac_preconditioner()``           one pass: :func:`jaxinf.kfac`'s ``stream_init`` (factors)
``ekfac_preconditioner()``          two passes: :func:`jaxinf.ekfac`'s ``stream_init``
``nystrom_preconditioner(r)``       one pass: the sketch ``Y = C Ω`` of ``r`` columns
``jacobi_preconditioner(s)``        one pass: ``s`` Hutchinson probes ``z ⊙ (C + Λ) z``
==================================  ===========================================================

Each state equals ``preconditioner.init`` on the same examples in memory (the
same key gives the same draws: the K-FAC/EK-FAC sampled Fisher keys every
example by its index in the whole dataset, so the state does not depend on
the batching, the devices or the processes). The pre-conditioner is rebuilt
from its recorded ``config`` (the factory's arguments); an argument this
module cannot reproduce (a ``model_fn`` or ``output_loss`` given to the
pre-conditioner rather than to the model, or an option it does not know)
raises instead of being dropped.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.sketch import nystrom_from_sketch, sketch_test_matrix
from jaxinf.core.tree import is_tracer
from jaxinf.solvers import kfac_preconditioner as kfac_module
from jaxinf.solvers import preconditioners as pre_module
from jaxinf.solvers.base import Solver
from jaxinf.solvers.cg import CGState
from jaxinf.solvers.kfac import ekfac
from jaxinf.solvers.kfac_preconditioner import KFACPreconditionerState
from jaxinf.solvers.preconditioners import JacobiState, NystromPreconditionerState

PyTree = Any

__all__ = ["cg_config", "cg_state_from_passes", "draws_per_example", "fit_preconditioner", "preconditioner_from_config"]

_FACTORIES = {
    "kfac_preconditioner": kfac_module.kfac_preconditioner,
    "ekfac_preconditioner": kfac_module.ekfac_preconditioner,
    "nystrom_preconditioner": pre_module.nystrom_preconditioner,
    "jacobi_preconditioner": pre_module.jacobi_preconditioner,
}
#: The arguments each factory's stream fit reproduces; any other argument must keep its default.
_REPRODUCED = {
    "kfac_preconditioner": {
        "fisher",
        "likelihood",
        "num_samples",
        "factor_dtype",
        "block_max_size",
        "damping_multiple",
    },
    "nystrom_preconditioner": {"rank", "batch_size"},
    "jacobi_preconditioner": {"num_samples", "batch_size"},
}
_REPRODUCED["ekfac_preconditioner"] = _REPRODUCED["kfac_preconditioner"]


def cg_config(solver: Solver) -> dict:
    """The recorded configuration of a :func:`jaxinf.cg` solver (``rtol``, ``maxiter``, ``preconditioner``, ...).

    Raises:
      TypeError: ``solver`` is not a :func:`jaxinf.cg` solver.
    """
    config = getattr(solver, "config", None)
    if not isinstance(solver, Solver) or not isinstance(config, dict) or config.get("factory") != "cg":
        name = getattr(solver, "name", type(solver).__name__)
        raise TypeError(f"Expected a jaxinf.cg(...) solver (optionally with a preconditioner), got {name!r}.")
    return config


def draws_per_example(solver: Solver) -> bool:
    """Whether ``solver``'s fit draws per example (sampled Fisher labels): K-FAC/EK-FAC, or CG with them as M."""
    if solver.name in ("kfac", "ekfac"):
        return True
    config = getattr(solver, "config", None) or {}
    pre = config.get("preconditioner") if config.get("factory") == "cg" else None
    return isinstance(pre, dict) and pre.get("factory") in ("kfac_preconditioner", "ekfac_preconditioner")


def _checked(config: dict) -> str:
    """The factory of a pre-conditioner ``config``, after checking that its stream fit reproduces every argument."""
    factory = config.get("factory") if isinstance(config, dict) else None
    if factory not in _FACTORIES:
        raise ValueError(
            f"Cannot fit the pre-conditioner {factory or config!r} from a stream; streamed CG supports "
            "jaxinf.kfac_preconditioner, ekfac_preconditioner, nystrom_preconditioner and jacobi_preconditioner."
        )
    defaults = inspect.signature(inspect.unwrap(_FACTORIES[factory])).parameters
    for name, value in config.items():
        if name == "factory" or name in _REPRODUCED[factory]:
            continue
        default = defaults[name].default if name in defaults else inspect.Parameter.empty
        if value is not None and value != default:
            advice = (
                " Give model_fn and output_loss to the InfluenceModel (curvature='gauss_newton'): the "
                "pre-conditioner takes them from the operator."
                if name in ("model_fn", "output_loss")
                else ""
            )
            raise ValueError(
                f"{factory}({name}=...) cannot be reproduced by a fit from a stream (it rebuilds the pre-conditioner "
                f"from its recorded arguments, and {name} is recorded as {value!r}).{advice}"
            )
    return factory


def _arguments(config: dict) -> dict:
    """The factory arguments that rebuild the pre-conditioner of ``config`` (checked by :func:`_checked`)."""
    args = {name: config[name] for name in _REPRODUCED[_checked(config)] if name in config}
    if args.get("factor_dtype") is not None:
        args["factor_dtype"] = jnp.dtype(args["factor_dtype"])
    return args


def preconditioner_from_config(config: dict):
    """The :class:`jaxinf.solvers.preconditioners.Preconditioner` whose recorded ``config`` is given (its ``apply``)."""
    return _FACTORIES[_checked(config)](**_arguments(config))


def fit_preconditioner(config: dict, stream, key: jax.Array | None = None) -> Any:
    """The state ``init`` of the pre-conditioner recorded in ``config`` gives, fitted by passes over ``stream``.

    Args:
      config: the pre-conditioner's ``config`` (``preconditioner.config``, or
        ``cg_config(solver)["preconditioner"]``).
      stream: a :class:`jaxinf.solvers.base.BatchStreamLike` (its
        ``operator`` on the first batch gives the layout and the damping;
        Nyström and Jacobi also need its ``matmat``).
      key: the key ``init`` would get (``None``: ``jax.random.key(0)``, as
        :func:`jaxinf.cg`'s ``init``).

    Returns:
      The pre-conditioner's state (what its ``apply`` takes).

    Raises:
      ValueError: a pre-conditioner or argument that cannot be reproduced
        (see the module docstring); a K-FAC/EK-FAC pre-conditioner with a
        damping that is not ``> 0``; a Nyström rank above the parameter count.
    """
    factory, args = _checked(config), _arguments(config)
    key = jax.random.key(0) if key is None else key
    operator: CurvatureOperator = stream.operator
    if factory in ("kfac_preconditioner", "ekfac_preconditioner"):
        positive = _check_positive(operator, factory)
        multiple = float(args.pop("damping_multiple", 1.0))
        # as kfac_preconditioner builds it: the operator's damping (times damping_multiple), no heuristic
        solver = ekfac(update_diagonal=factory == "ekfac_preconditioner", damping_heuristic=None, **args)
        state = solver.stream_init(stream, key=key)
        if multiple != 1.0:
            damping = tuple(d * multiple for d in state.damping)
            fallback = tuple(d * multiple for d in state.fallback_damping)
            state = dataclasses.replace(state, damping=damping, fallback_damping=fallback)
        return KFACPreconditionerState(state, stream.replicate(positive))
    if factory == "nystrom_preconditioner":
        return _nystrom(operator, stream, int(args["rank"]), key)
    return _jacobi(operator, stream, int(args["num_samples"]), key)


def _check_positive(operator: CurvatureOperator, factory: str) -> jax.Array:
    """``all(λ > 0)``; raises when the damping is concrete and not positive (``M⁻¹ = (K + λI)⁻¹`` must be SPD)."""
    values = [d for d in operator.damping if not is_tracer(d)]
    if values and not np.all(np.asarray([float(d) for d in values]) > 0):
        raise ValueError(
            f"{factory} needs damping > 0: M⁻¹ = (K + λI)⁻¹ must be positive definite for CG, and the damping is "
            f"{min(float(d) for d in values):.3g}. Build the InfluenceModel with damping > 0 (e.g. damping=1e-3)."
        )
    return jnp.all(jnp.stack([jnp.asarray(d) > 0 for d in operator.damping])) if operator.damping else jnp.asarray(True)


_nystrom_from_sketch = jax.jit(nystrom_from_sketch)  # one program per shape, shared by every fit


def _nystrom(operator: CurvatureOperator, stream, rank: int, key) -> NystromPreconditionerState:
    """:func:`jaxinf.nystrom_preconditioner`'s ``init`` with the sketch ``Y = C Ω`` from one pass."""
    pre_module.check_nystrom_rank(rank, operator.size)
    omega = stream.replicate(sketch_test_matrix(key, operator.size, rank, operator.dtype))
    approx = _nystrom_from_sketch(omega, stream.matmat(omega, desc="Nyström pre-conditioner sketch"))
    state = pre_module.nystrom_state(operator, approx)
    return state._replace(damping=stream.replicate(state.damping))


def _jacobi(operator: CurvatureOperator, stream, num_samples: int, key) -> JacobiState:
    """:func:`jaxinf.jacobi_preconditioner`'s ``init``: the same Hutchinson probes, all products in one pass."""
    p, dtype = operator.size, operator.dtype
    probes = jax.vmap(lambda i: pre_module.hutchinson_probe(key, i, p, dtype))(jnp.arange(num_samples))
    products = stream.matmat(stream.replicate(probes.T), desc="Jacobi pre-conditioner probes").T
    samples = probes * (products + probes * pre_module.damping_vector(operator))
    estimate = pre_module.diagonal_estimate(jnp.sum(samples, 0), jnp.sum(samples**2, 0), num_samples)
    return stream.replicate(pre_module.jacobi_state(operator, *estimate))


def cg_state_from_passes(solver: Solver, operator: CurvatureOperator, stream, key) -> CGState:
    """A :func:`jaxinf.cg` solver's state with its pre-conditioner fitted by passes over ``stream``."""
    pre = cg_config(solver).get("preconditioner")
    return CGState(operator, None if pre is None else fit_preconditioner(pre, stream, key))
