"""K-FAC and EK-FAC as pre-conditioners of conjugate gradient.

Used as an answer, K-FAC / EK-FAC replace the curvature ``C`` by a
layer-wise Kronecker approximation ``K`` and return ``(K + λI)⁻¹ v``, which
is fast but only as accurate as ``K``. Used as a pre-conditioner of
:func:`jaxinf.cg`, the same fitted state gives ``M⁻¹ = (K + Λ)⁻¹`` and CG
still solves the exact system ``(C + Λ) x = v``: its iterations depend on the
spectrum of ``M⁻¹ (C + Λ)`` instead of ``C + Λ``, so a good ``K`` cuts them
while the answer stays exact (to CG's tolerance).

``init(operator, key)`` fits the state with the :func:`jaxinf.ekfac` solver's
own ``init`` (same factor passes, same options) and ``apply(state, r)`` is
its inverse, per layer in the Kronecker eigenbasis::

    M⁻¹ r = Q_A [ (Q_Aᵀ R Q_G) / (Λ + λ) ] Q_Gᵀ

(``R`` the layer's part of ``r`` as a matrix, ``Λ = λ_A λ_Gᵀ`` for K-FAC and
the corrected second moments for EK-FAC), fallback leaves by their diagonal
or exact block. ``M⁻¹`` is symmetric, and positive definite exactly when
every ``Λ + λ > 0``: ``Λ ≥ 0``, so the operator's damping must be positive
(the ``damping_heuristic`` of the solvers, which damps where the operator
does not, is not used: the pre-conditioner approximates the operator CG
solves, and with ``λ = 0`` that operator is singular wherever ``K`` is).
``damping_multiple=c`` uses ``M = K + cλ`` instead (CG's answer unchanged).

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature", ICML 2015. George, Laurent, Bouthillier, Ballas &
  Vincent, "Fast Approximate Natural Gradient Descent in a Kronecker-factored
  Eigenbasis", NeurIPS 2018.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.tree import is_tracer
from jaxinf.solvers.base import records_config
from jaxinf.solvers.kfac import KFACState, ekfac
from jaxinf.solvers.preconditioners import Preconditioner

PyTree = Any


class KFACPreconditionerState(NamedTuple):
    """The fitted :class:`jaxinf.KFACState` and ``positive``: whether every damping of the operator is ``> 0``.

    ``positive`` is checked on the host when the damping is concrete (``init``
    raises); under ``jit`` it is carried here and a ``False`` turns ``apply``'s
    output into NaN, which CG reports as divergence.
    """

    kfac: KFACState
    positive: jax.Array


def _check_damping(operator: CurvatureOperator, name: str) -> jax.Array:
    """``all(λ > 0)`` over the operator's dampings; raise at once when they are concrete and not all positive."""
    damping = operator.damping
    if not any(is_tracer(d) for d in damping):
        values = np.asarray([float(d) for d in damping])
        if values.size and not np.all(values > 0):
            raise ValueError(
                f"{name}_preconditioner needs damping > 0: M⁻¹ = (K + λI)⁻¹ must be positive definite for CG, and "
                f"the operator's damping is {values.min():.3g}. Build the operator (or InfluenceModel) with "
                "damping > 0 (e.g. damping=1e-3), or use jaxinf.nystrom_preconditioner, which floors its own."
            )
    return jnp.all(jnp.stack([jnp.asarray(d) > 0 for d in damping])) if damping else jnp.asarray(True)


def _check_multiple(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"damping_multiple must be a finite number > 0 (M = K + damping_multiple·λ), got {value!r}; "
            "1.0 damps the pre-conditioner as the operator."
        )
    return float(value)


def _factory(
    update_diagonal: bool,
    *,
    fisher: str,
    likelihood: str | None,
    num_samples: int,
    model_fn: Callable | None,
    output_loss: Callable | None,
    factor_dtype: Any,
    block_max_size: int,
    damping_multiple: float,
) -> Preconditioner:
    multiple = _check_multiple(damping_multiple)
    # damping_heuristic=None: the pre-conditioner is damped as the operator CG solves (checked > 0), times `multiple`
    solver = ekfac(
        update_diagonal=update_diagonal,
        fisher=fisher,
        likelihood=likelihood,
        num_samples=num_samples,
        model_fn=model_fn,
        output_loss=output_loss,
        damping_heuristic=None,
        factor_dtype=factor_dtype,
        block_max_size=block_max_size,
    )
    name = "ekfac" if update_diagonal else "kfac"

    def init(operator: CurvatureOperator, key: jax.Array) -> KFACPreconditionerState:
        positive = _check_damping(operator, name)
        if operator.num_blocks > 1:  # CG honours the blocks; M only approximates (damping stays per leaf)
            operator = dataclasses.replace(operator, block_ids=(0,) * len(operator.block_ids), block_names=("all",))
        state = solver.init(operator, key=key)
        if multiple != 1.0:  # M = K + cλ: only the pre-conditioner's damping changes, CG still solves (C + λ) x = v
            state = dataclasses.replace(
                state,
                damping=tuple(d * multiple for d in state.damping),
                fallback_damping=tuple(d * multiple for d in state.fallback_damping),
            )
        return KFACPreconditionerState(state, positive)

    def apply(state: KFACPreconditionerState, r: PyTree) -> PyTree:
        # the solver's solve is (K + λ)⁻¹ r; its residual check only feeds `info`, which XLA drops here
        x = solver.solve(state.kfac, r)[0]
        return jax.tree.map(lambda a: jnp.where(state.positive, a, jnp.nan), x)

    label = name if multiple == 1.0 else f"{name}(damping×{multiple:g})"
    return Preconditioner(init=init, apply=apply, name=label)


@records_config
def ekfac_preconditioner(
    *,
    fisher: str = "auto",
    likelihood: str | None = None,
    num_samples: int = 1,
    model_fn: Callable | None = None,
    output_loss: Callable | None = None,
    factor_dtype: Any = None,
    block_max_size: int = 256,
    damping_multiple: float = 1.0,
) -> Preconditioner:
    """EK-FAC pre-conditioner ``M⁻¹ = (K_EKFAC + Λ)⁻¹`` for :func:`jaxinf.cg` (plain and block).

    ``K_EKFAC = (Q_A ⊗ Q_G) diag(Λ) (Q_A ⊗ Q_G)ᵀ`` per layer, ``Λ`` the
    second moments of the per-example gradients in the Kronecker eigenbasis
    (George et al. 2018); see :mod:`jaxinf.solvers.kfac_preconditioner`.
    ``init`` runs :func:`jaxinf.ekfac`'s fit on the operator CG solves (two
    passes over ``operator.data``); ``apply`` costs two small matrix products
    per layer, far below one curvature-vector product.

    Args:
      fisher, likelihood, num_samples, model_fn, output_loss, factor_dtype,
        block_max_size: as in :func:`jaxinf.ekfac`, passed through (an
        option that cannot take effect raises there, e.g. ``likelihood``
        with the empirical Fisher). ``damping_heuristic`` is not an option:
        ``M`` is damped with the operator's damping, which must be ``> 0``.
      damping_multiple: ``c`` in ``M = K + c·Λ`` (``Λ`` the operator's
        damping; finite, ``> 0``; default 1). CG still solves the exact
        ``(C + Λ) x = v``; only ``M`` changes. A larger damping in ``M`` than
        in the operator is the usual remedy when ``K`` misses curvature that
        ``C`` has (Martens & Grosse 2015, §6): the directions where ``K`` is
        too small are then not over-amplified. Measured in
        ``benchmarks/preconditioners.py`` (``--kfac-damping-multiple``).

    Returns:
      A :class:`jaxinf.solvers.preconditioners.Preconditioner`.

    Raises:
      ValueError: a bad option (here, e.g. ``damping_multiple <= 0``); from ``init``, a damping that is not
        ``> 0`` (when it is concrete; under ``jit`` ``apply`` returns NaN and
        CG reports divergence) or what :func:`jaxinf.ekfac`'s ``init`` raises.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxinf
      >>> x = jax.random.normal(jax.random.key(0), (16, 3)); y = x @ jnp.ones((3, 2))
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> model = lambda p, b: b[0] @ p["w"] + p["b"]
      >>> mse = lambda out, b: 0.5 * jnp.mean(jnp.sum((out - b[1]) ** 2, -1))
      >>> op = jaxinf.curvature_operator(None, params, (x, y), kind="gauss_newton",
      ...                                model_fn=model, output_loss=mse, damping=0.1)
      >>> solver = jaxinf.cg(preconditioner=jaxinf.ekfac_preconditioner(fisher="exact"))
      >>> v = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
      >>> sol, info = solver.solve(solver.init(op), v)
      >>> int(info.iterations)  # one dense layer, exact Fisher: the Kronecker factorisation is exact
      1

    References:
      George et al., NeurIPS 2018 (EK-FAC); Martens & Grosse, ICML 2015 (K-FAC).
    """
    return _factory(
        True,
        fisher=fisher,
        likelihood=likelihood,
        num_samples=num_samples,
        model_fn=model_fn,
        output_loss=output_loss,
        factor_dtype=factor_dtype,
        block_max_size=block_max_size,
        damping_multiple=damping_multiple,
    )


@records_config
def kfac_preconditioner(
    *,
    fisher: str = "auto",
    likelihood: str | None = None,
    num_samples: int = 1,
    model_fn: Callable | None = None,
    output_loss: Callable | None = None,
    factor_dtype: Any = None,
    block_max_size: int = 256,
    damping_multiple: float = 1.0,
) -> Preconditioner:
    """K-FAC pre-conditioner ``M⁻¹ = (A ⊗ G + Λ)⁻¹`` per layer, for :func:`jaxinf.cg` (plain and block).

    As :func:`ekfac_preconditioner` with K-FAC's eigenvalues ``Λ = λ_A λ_Gᵀ``
    (Martens & Grosse 2015): one pass over the data to fit. Takes the same
    options, passed through to :func:`jaxinf.kfac` (``damping_multiple``
    as in :func:`ekfac_preconditioner`).

    Examples:
      >>> import jaxinf
      >>> jaxinf.cg(preconditioner=jaxinf.kfac_preconditioner()).name
      'cg+kfac'
    """
    return _factory(
        False,
        fisher=fisher,
        likelihood=likelihood,
        num_samples=num_samples,
        model_fn=model_fn,
        output_loss=output_loss,
        factor_dtype=factor_dtype,
        block_max_size=block_max_size,
        damping_multiple=damping_multiple,
    )


__all__ = ["KFACPreconditionerState", "ekfac_preconditioner", "kfac_preconditioner"]
