"""The exact solver: dense curvature, factorised once, many right-hand sides.

Solves ``(C + λI) x = v`` exactly by forming the dense (block-diagonal)
curvature on the raveled parameters, ``C_b = Q_b diag(w_b) Q_bᵀ`` per block,
and applying ``x_b = Q_b diag(1 / (w_b + λ_b)) Q_bᵀ v_b`` (Koh & Liang 2017
use this for small models; it is the ground truth every other solver is
tested against). Forming ``C`` costs ``p`` curvature-vector products and
``O(p²)`` memory; the eigendecomposition ``O(p³)``; each solve ``O(p²)``.

The undamped eigenpairs are stored, so damping can be changed after fitting
without refactorising (:func:`with_damping`).

Derivatives. ``solve`` is linear in ``v`` and in ``(w_b + λ_b)⁻¹``, so
``jax.grad`` with respect to ``v`` and to the state's damping is exact
(``v̄ = (C + Λ)⁻¹ x̄``, ``λ̄_b = −x̄_bᵀ (C_bb + λ_b)⁻¹ x_b``). The eigenpairs
are never differentiated: the derivative of ``eigh`` is wrong or infinite where
eigenvalues repeat (the zero eigenvalues of any rank-deficient curvature), so
``solve`` raises ``TypeError`` when they depend on a differentiated variable.
For gradients with respect to the parameters ``θ`` and the training data use
:func:`jaxinf.implicit_solve`, which differentiates ``x = A(θ)⁻¹ v``
implicitly through the operator's products: ``θ̄ = −∂_θ⟨A⁻¹x̄, A(θ) x⟩``,
exact for this solver (it holds ``A⁻¹`` exactly).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.curvature import CurvatureOperator
from jaxinf.core.memory import available_bytes
from jaxinf.core.tree import TreeSpec, check_matches, ravel, unravel
from jaxinf.solvers.autodiff import factorisation_message, frozen
from jaxinf.solvers.base import Solver, make_info, records_config


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class DirectState:
    """Per block ``b``: eigenvectors ``Q_b``, undamped eigenvalues ``w_b``,
    damping ``λ_b`` and the positions ``idx_b`` of the block in the raveled
    parameter vector. ``spec`` (static) describes the parameter tree."""

    eigvecs: tuple
    eigvals: tuple
    damping: tuple
    indices: tuple
    spec: TreeSpec
    block_names: tuple

    def tree_flatten(self):
        return (self.eigvecs, self.eigvals, self.damping, self.indices), (self.spec, self.block_names)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)


def dense_curvature(operator: CurvatureOperator, block: int = 0, *, column_batch: int = 128):
    """The dense undamped curvature block ``C_bb`` (symmetrised), by ``p_b`` products.

    Columns are computed ``column_batch`` at a time with ``lax.map``, so the
    intermediate memory is that of ``column_batch`` simultaneous products.
    """
    spec = operator.spec
    p = spec.size
    dtype = spec.dtype
    idx = operator.block_flat_indices(block)
    idx_j = jnp.asarray(idx)

    def column(j):
        e = jax.nn.one_hot(j, p, dtype=dtype)
        return ravel(operator.curvature_vp(unravel(spec, e)), dtype)[idx_j]

    cols = jax.lax.map(column, idx_j, batch_size=max(1, min(column_batch, len(idx))))
    return 0.5 * (cols + cols.T)


def required_bytes(operator: CurvatureOperator) -> int:
    """Memory ``direct`` needs: matrix, eigenvectors and LAPACK workspace per block."""
    itemsize = jnp.dtype(operator.dtype).itemsize
    sizes = [len(operator.block_flat_indices(b)) for b in range(operator.num_blocks)]
    return sum(3 * s * s * itemsize for s in sizes)


@records_config
def direct(*, max_memory: int | None = None, column_batch: int = 128) -> Solver:
    """Exact solver: ``x = (C + λI)⁻¹ v`` from a dense eigendecomposition.

    Args:
      max_memory: bytes the dense matrices may use; default: the memory free
        on the default device now. ``init`` refuses larger problems.
      column_batch: curvature-vector products computed at once while forming
        the dense matrix.

    Returns:
      A :class:`jaxinf.Solver`.

    Raises:
      ValueError: from ``init``, when the dense matrices would not fit, with
        the memory they need; from ``validate``, when ``C + λI`` is singular.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxinf
      >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x, y = jnp.eye(3), jnp.ones(3)
      >>> op = jaxinf.curvature_operator(loss, jnp.zeros(3), (x, y), damping=0.0)
      >>> solver = jaxinf.direct()
      >>> sol, info = solver.solve(solver.init(op), jnp.ones(3))
      >>> sol.tolist()  # H = (2/3) I
      [1.5, 1.5, 1.5]

    References:
      Koh & Liang, "Understanding Black-box Predictions via Influence
      Functions", ICML 2017.
    """
    if column_batch < 1:
        raise ValueError(f"column_batch must be >= 1, got {column_batch}.")

    def init(operator: CurvatureOperator, *, key=None) -> DirectState:
        del key
        check_memory(operator, required_bytes(operator), max_memory)
        blocks = [dense_curvature(operator, b, column_batch=column_batch) for b in range(operator.num_blocks)]
        return state_from_blocks(operator, blocks)

    def apply(state: DirectState, b, power):
        x = jnp.zeros_like(b)
        for q, w, lam, idx in zip(state.eigvecs, state.eigvals, state.damping, state.indices):
            coeff = (q.T @ b[idx]) * (w + lam.astype(w.dtype)) ** power
            x = x.at[idx].set(q @ coeff)
        return x

    def solve(state: DirectState, v):
        check_matches(v, state.spec, "v")
        factors = frozen((state.eigvecs, state.eigvals), factorisation_message("direct()"))
        state = dataclasses.replace(state, eigvecs=factors[0], eigvals=factors[1])
        dtype = state.spec.dtype
        b = ravel(v, dtype)
        x = apply(state, b, -1)
        residual = jnp.linalg.norm(apply(state, x, 1) - b)
        ok = jnp.all(jnp.isfinite(x)) & ~_singular(state)
        return unravel(state.spec, x), make_info(1, residual, ok, ~jnp.all(jnp.isfinite(x)))

    def validate(state: DirectState) -> None:
        for name, w, lam in zip(state.block_names, state.eigvals, state.damping):
            w = np.asarray(w, np.float64)
            shifted = w + float(lam)
            top = np.max(np.abs(shifted))
            tol = w.size * np.finfo(np.asarray(state.eigvals[0]).dtype).eps * max(top, 1e-300)
            if np.min(np.abs(shifted)) <= tol:
                raise ValueError(
                    f"The damped curvature of block {name!r} is singular: smallest |eigenvalue| "
                    f"{np.min(np.abs(shifted)):.3g} against largest {top:.3g} (damping={float(lam):.3g}). "
                    f"Set damping > 0, e.g. damping={max(1e-3 * top, 1e-8):.3g}."
                )
            negative = int(np.sum(shifted < -tol))
            if negative:
                warnings.warn(
                    f"C + λI of block {name!r} has {negative} negative eigenvalue(s) (most negative "
                    f"{np.min(shifted):.3g}); the solve is exact, but influence under an indefinite "
                    "curvature can flip signs. Consider curvature='gauss_newton' or a larger damping.",
                    stacklevel=3,
                )

    def stream_init(stream, *, key=None) -> DirectState:
        """One pass over a stream (:func:`jaxinf.scale.fit_from_stream`): the dense curvature, then ``eigh``."""
        del key
        return fit_dense(stream.operator, stream.curvature.dense, max_memory=max_memory, column_batch=column_batch)

    return Solver(init=init, solve=solve, validate=validate, name="direct", stream_init=stream_init)


def check_memory(operator: CurvatureOperator, need: int, max_memory: int | None, *, what: str = "direct()") -> None:
    """``ValueError`` with the GiB needed when ``need`` bytes exceed ``max_memory`` (default: free memory)."""
    budget = available_bytes() if max_memory is None else int(max_memory)
    if need > budget:
        raise ValueError(
            f"{what} needs about {need / 2**30:.2f} GiB for the dense curvature of {operator.size} "
            f"parameters ({operator.num_blocks} block(s)), but {budget / 2**30:.2f} GiB is available. "
            "Use blocks='layer', an iterative or low-rank solver (cg, arnoldi, ekfac), "
            "or raise max_memory if you know it fits."
        )


def state_from_blocks(layout: CurvatureOperator, blocks) -> DirectState:
    """:class:`DirectState` from the dense (symmetric) curvature of each block of ``layout``: one ``eigh`` each."""
    eigvecs, eigvals, indices = [], [], []
    for b, matrix in enumerate(blocks):
        w, q = jnp.linalg.eigh(matrix)
        eigvecs.append(q)
        eigvals.append(w)
        indices.append(jnp.asarray(layout.block_flat_indices(b)))
    damping = tuple(layout.damping[layout.block_leaf_indices(b)[0]] for b in range(layout.num_blocks))
    return DirectState(tuple(eigvecs), tuple(eigvals), damping, tuple(indices), layout.spec, layout.block_names)


def fit_dense(layout: CurvatureOperator, dense: Callable, *, max_memory: int | None, column_batch: int) -> DirectState:
    """:class:`DirectState` from a full dense curvature ``dense(column_batch=...) -> (p, p)`` laid out as ``layout``.

    Used for streamed fits: ``dense`` is one pass over the data
    (``StreamingCurvature.dense``); ``layout`` is an operator on any one batch
    (block structure, damping and parameter layout; none of its products run).
    Refuses, before the pass, matrices larger than ``max_memory``.
    """
    need = required_bytes(layout) + layout.size * layout.size * jnp.dtype(layout.dtype).itemsize
    check_memory(layout, need, max_memory, what="direct() from a stream")
    full = dense(column_batch=column_batch)
    blocks = []
    for b in range(layout.num_blocks):
        idx = np.asarray(layout.block_flat_indices(b))
        blocks.append(full[np.ix_(idx, idx)])
    return state_from_blocks(layout, blocks)


def _singular(state: DirectState):
    flags = []
    for w, lam in zip(state.eigvals, state.damping):
        shifted = w + lam.astype(w.dtype)
        top = jnp.max(jnp.abs(shifted))
        flags.append(jnp.min(jnp.abs(shifted)) <= w.size * jnp.finfo(w.dtype).eps * top)
    return jnp.any(jnp.stack(flags))


def bind(state: DirectState, operator: CurvatureOperator) -> DirectState:
    """``state`` with the damping of ``operator`` (per block), after checking it was fitted for that layout."""
    if state.spec != operator.spec or tuple(state.block_names) != tuple(operator.block_names):
        raise ValueError(
            "The direct() state was fitted for another parameter layout or block structure than the operator "
            f"(blocks {list(state.block_names)} against {list(operator.block_names)}); fit it with "
            "solver.init(operator), or pass state=None."
        )
    damping = tuple(operator.damping[operator.block_leaf_indices(b)[0]] for b in range(operator.num_blocks))
    return dataclasses.replace(state, damping=damping)


def with_damping(state: DirectState, damping: Any) -> DirectState:
    """The same factorisation with a new scalar damping (no refactorisation)."""
    value = jnp.asarray(damping)
    return dataclasses.replace(state, damping=tuple(value for _ in state.damping))
