"""The exact solver: dense curvature, factorised once, many right-hand sides.

Solves ``(C + λI) x = v`` exactly by forming the dense (block-diagonal)
curvature ``C_b`` on the raveled parameters and factorising each block once
(Koh & Liang 2017 use this for small models; it is the ground truth every
other solver is tested against), in one of two ways:

* Cholesky, ``C_b + λ_b I = L_b L_bᵀ`` and ``x_b = L_b⁻ᵀ (L_b⁻¹ v_b)``:
  ``p³/3`` flops, an order of magnitude faster than ``eigh`` (issue 15: the
  ``eigh`` took about 90% of a fit at ``p = 2,410``), and possible exactly
  when the damped block is positive definite (Gauss-Newton or Fisher with
  ``λ > 0``, a Hessian near a minimum).
* the eigendecomposition ``C_b = Q_b diag(w_b) Q_bᵀ`` and
  ``x_b = Q_b diag(1 / (w_b + λ_b)) Q_bᵀ v_b``: any symmetric block
  (negative eigenvalues are counted and warned about by ``validate``), and
  damping changes without refactorising.

``factorization="auto"`` (default) attempts Cholesky on each block and, where
it fails (``cholesky`` returns NaN for a matrix that is not numerically
positive definite), decomposes that block with ``eigh``. The choice is made
inside the compiled ``init`` (``lax.cond``: no host round-trip) and recorded
in the state: ``state.factorizations``, e.g. ``('cholesky',)``, also in its
``repr``. Forming ``C`` costs ``p`` curvature-vector products and ``O(p²)``
memory; each solve ``O(p²)``.

Damping. :func:`with_damping` changes the damping of an ``eigh`` block for
free; a Cholesky block is refactorised, ``L'L'ᵀ = L Lᵀ + (λ' − λ) I`` (one
matrix product and one Cholesky, still far below one ``eigh``). Use
``factorization="eigh"`` to sweep many dampings on one fit.

Derivatives. ``solve`` is linear in ``v`` and ``jax.grad`` with respect to
``v`` and to the state's damping is exact (``v̄ = (C + Λ)⁻¹ x̄``,
``λ̄_b = −x̄_bᵀ (C_bb + λ_b)⁻¹ x_b``: in closed form for ``eigh`` blocks, by
a custom JVP for Cholesky blocks). The factors are never differentiated:
the derivative of ``eigh`` is wrong or infinite where eigenvalues repeat (the
zero eigenvalues of any rank-deficient curvature), so ``solve`` raises
``TypeError`` when they depend on a differentiated variable. For gradients
with respect to the parameters ``θ`` and the training data use
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
from jaxinf.core.linalg import in_sequence
from jaxinf.core.memory import available_bytes
from jaxinf.core.tree import TreeSpec, check_matches, is_tracer, ravel, unravel
from jaxinf.solvers.autodiff import factorisation_message, frozen
from jaxinf.solvers.base import Solver, make_info, records_config
from jaxinf.solvers.dense_factor import cholesky_inverse, factor_block

FACTORIZATIONS = ("auto", "cholesky", "eigh")
ADVICE = (
    "Set damping > 0 (larger if C + λI is near singular); with factorization='cholesky' on a curvature that is "
    "not positive definite use factorization='auto' (eigh where Cholesky fails) or curvature='gauss_newton'."
)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class DirectState:
    """The factorised dense curvature, per block ``b`` (:mod:`jaxinf.solvers.direct`).

    Attributes:
      factors: ``L_b`` (lower, ``L_b L_bᵀ = C_b + λ⁰_b I``) where
        ``cholesky[b]``, else the eigenvectors ``Q_b``.
      eigvals: the undamped eigenvalues ``w_b`` of an ``eigh`` block (NaN for
        a Cholesky block).
      damping: ``λ_b``.
      indices: the positions of the block in the raveled parameter vector.
      cholesky: bool per block: which factorisation the block holds.
      factored_damping: ``λ⁰_b``, the damping inside ``L_b``.
      bounds: ``(smallest, largest)`` eigenvalue of ``L_b L_bᵀ``, estimated
        (Cholesky blocks; NaN where Cholesky failed or for ``eigh`` blocks).
      spec, block_names: (static) the parameter tree and the block names.
      factorization: (static) the option it was fitted with.
    """

    factors: tuple
    eigvals: tuple
    damping: tuple
    indices: tuple
    cholesky: tuple
    factored_damping: tuple
    bounds: tuple
    spec: TreeSpec
    block_names: tuple
    factorization: str = "eigh"

    def tree_flatten(self):
        children = (self.factors, self.eigvals, self.damping, self.indices, self.cholesky, self.factored_damping,
                    self.bounds)
        return children, (self.spec, self.block_names, self.factorization)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def factorizations(self) -> tuple:
        """Per block, the factorisation that ran: ``"cholesky"`` or ``"eigh"`` (``"traced"`` inside ``jit``)."""
        if self.factorization != "auto":
            return tuple(self.factorization for _ in self.block_names)
        return tuple("traced" if is_tracer(c) else ("cholesky" if bool(c) else "eigh") for c in self.cholesky)

    def __repr__(self) -> str:
        sizes = [int(np.shape(i)[0]) for i in self.indices]
        return (f"DirectState(blocks={list(self.block_names)}, sizes={sizes}, factorization={self.factorization!r}, "
                f"factorizations={self.factorizations})")


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
    """Memory ``direct`` needs: matrix, factor and LAPACK workspace (or eigenvectors) per block."""
    itemsize = jnp.dtype(operator.dtype).itemsize
    sizes = [len(operator.block_flat_indices(b)) for b in range(operator.num_blocks)]
    return sum(3 * s * s * itemsize for s in sizes)


@records_config
def direct(*, max_memory: int | None = None, column_batch: int = 128, factorization: str = "auto") -> Solver:
    """Exact solver: ``x = (C + λI)⁻¹ v`` from a dense Cholesky factorisation or eigendecomposition.

    Args:
      max_memory: bytes the dense matrices may use; default: the memory free
        on the default device now. ``init`` refuses larger problems.
      column_batch: curvature-vector products computed at once while forming
        the dense matrix.
      factorization: ``"auto"`` (default): Cholesky of ``C_b + λ_b I`` where
        it is positive definite, ``eigh`` of ``C_b`` elsewhere (decided per
        block inside ``init``); ``"cholesky"``: Cholesky only, and a block
        that is not positive definite raises (in ``init`` outside ``jit``,
        else in ``validate``; the solve reports ``diverged``);
        ``"eigh"``: always the eigendecomposition (free re-damping by
        :func:`with_damping`). ``state.factorizations`` says which ran.

    Returns:
      A :class:`jaxinf.Solver`.

    Raises:
      ValueError: a bad ``column_batch`` or ``factorization``; from ``init``,
        when the dense matrices would not fit, with the memory they need;
        from ``validate``, when ``C + λI`` is singular, or not positive
        definite with ``factorization="cholesky"``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxinf
      >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x, y = jnp.eye(3), jnp.ones(3)
      >>> op = jaxinf.curvature_operator(loss, jnp.zeros(3), (x, y), damping=0.0)
      >>> solver = jaxinf.direct()
      >>> state = solver.init(op)
      >>> sol, info = solver.solve(state, jnp.ones(3))
      >>> [round(float(s), 5) for s in sol], state.factorizations  # H = (2/3) I: PD, so Cholesky
      ([1.5, 1.5, 1.5], ('cholesky',))

    References:
      Koh & Liang, "Understanding Black-box Predictions via Influence
      Functions", ICML 2017.
    """
    if column_batch < 1:
        raise ValueError(f"column_batch must be >= 1, got {column_batch}.")
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"factorization must be one of {FACTORIZATIONS}, got {factorization!r}.")

    def init(operator: CurvatureOperator, *, key=None) -> DirectState:
        del key
        check_memory(operator, required_bytes(operator), max_memory)
        blocks = [dense_curvature(operator, b, column_batch=column_batch) for b in range(operator.num_blocks)]
        return state_from_blocks(operator, blocks, factorization=factorization)

    def solve(state: DirectState, v):
        check_matches(v, state.spec, "v")
        factors = frozen((state.factors, state.eigvals), factorisation_message("direct()"))
        state = dataclasses.replace(state, factors=factors[0], eigvals=factors[1])
        b = ravel(v, state.spec.dtype)
        x = _apply(state, b, -1)
        residual = jnp.linalg.norm(_apply(state, x, 1) - b)
        finite = jnp.all(jnp.isfinite(x))
        return unravel(state.spec, x), make_info(1, residual, finite & ~_trouble(state), ~finite)

    def stream_init(stream, *, key=None) -> DirectState:
        """One pass over a stream (:func:`jaxinf.scale.fit_from_stream`): the dense curvature, then the factors."""
        del key
        return fit_dense(stream.operator, stream.curvature.dense, max_memory=max_memory, column_batch=column_batch,
                         factorization=factorization)

    return Solver(init=init, solve=solve, validate=validate, name="direct", advice=ADVICE, stream_init=stream_init)


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


def state_from_blocks(layout: CurvatureOperator, blocks, *, factorization: str = "auto") -> DirectState:
    """:class:`DirectState` from the dense (symmetric) curvature of each block of ``layout``, factorised in turn.

    The blocks are factorised one after another (:func:`jaxinf.core.linalg.in_sequence`): one matrix per LAPACK
    call at a time.
    """
    damping = tuple(layout.damping[layout.block_leaf_indices(b)[0]] for b in range(layout.num_blocks))
    parts, previous = [], None
    for matrix, lam in zip(blocks, damping):
        if previous is not None:
            previous, matrix = in_sequence(previous, matrix)
        parts.append(factor_block(matrix, lam, factorization))
        previous = parts[-1][0]
    factors, eigvals, chol, lam0, bounds = (tuple(part[k] for part in parts) for k in range(5))
    indices = tuple(jnp.asarray(layout.block_flat_indices(b)) for b in range(layout.num_blocks))
    state = DirectState(factors, eigvals, damping, indices, chol, lam0, bounds, layout.spec, layout.block_names,
                        factorization)
    _check_cholesky(state)
    return state


def fit_dense(
    layout: CurvatureOperator, dense: Callable, *, max_memory: int | None, column_batch: int, factorization="auto"
) -> DirectState:
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
    return state_from_blocks(layout, blocks, factorization=factorization)


def _apply(state: DirectState, b, power: int):
    """``(C + Λ)^power b`` for ``power`` ±1, block by block."""
    x = jnp.zeros_like(b)
    for q, w, lam, idx, chol in zip(state.factors, state.eigvals, state.damping, state.indices, state.cholesky):
        lam = lam.astype(q.dtype)
        rhs = b[idx]

        def by_eigh(q=q, w=w, lam=lam, rhs=rhs):
            return q @ ((q.T @ rhs) * (w + lam) ** power)

        def by_cholesky(q=q, lam=lam, rhs=rhs):
            return q @ (q.T @ rhs) if power > 0 else cholesky_inverse(q, lam, rhs)

        if state.factorization == "auto":
            out = jax.lax.cond(chol, by_cholesky, by_eigh)
        else:
            out = by_cholesky() if state.factorization == "cholesky" else by_eigh()
        x = x.at[idx].set(out)
    return x


def _extremes(state: DirectState, i: int):
    """``(smallest, largest)`` ``|eigenvalue|`` of damped block ``i``: exact (``eigh``) or estimated (Cholesky)."""
    shifted = jnp.abs(state.eigvals[i] + state.damping[i].astype(state.eigvals[i].dtype))
    chol, bounds = state.cholesky[i], state.bounds[i]
    return jnp.where(chol, bounds[0], jnp.min(shifted)), jnp.where(chol, bounds[1], jnp.max(shifted))


_all_extremes = jax.jit(lambda state: tuple(_extremes(state, i) for i in range(len(state.eigvals))))  # 1 program


def _trouble(state: DirectState):
    """Whether a block is singular, a failed Cholesky, or a Cholesky factor held at another damping."""
    flags = []
    for i, (w, lam, lam0) in enumerate(zip(state.eigvals, state.damping, state.factored_damping)):
        small, top = _extremes(state, i)
        flags.append(~(small > w.size * jnp.finfo(w.dtype).eps * top))  # NaN (failed Cholesky) counts too
        flags.append(state.cholesky[i] & (lam.astype(w.dtype) != lam0))
    return jnp.any(jnp.stack(flags))


def _check_cholesky(state: DirectState) -> None:
    """``factorization="cholesky"``: raise for a block whose damped curvature is not positive definite (host only)."""
    if state.factorization != "cholesky" or any(is_tracer(b) for b in state.bounds):
        return
    for name, bounds, lam in zip(state.block_names, state.bounds, state.damping):
        if not np.all(np.isfinite(np.asarray(bounds))):
            raise ValueError(
                f"direct(factorization='cholesky'): the damped curvature C + λI of block {name!r} is not positive "
                f"definite (its Cholesky factorisation failed at damping={float(lam):.3g}). Use "
                "factorization='auto' (eigh where Cholesky fails) or 'eigh', a larger damping, or "
                "curvature='gauss_newton'."
            )


def validate(state: DirectState) -> None:
    """Host-side checks of a fitted state: raise on singular blocks or failed Cholesky, warn on negative ones."""
    _check_cholesky(state)
    extremes = _all_extremes(state)
    for i, (name, w, lam) in enumerate(zip(state.block_names, state.eigvals, state.damping)):
        small, top = (float(e) for e in extremes[i])
        tol = w.size * np.finfo(np.asarray(w).dtype).eps * max(top, 1e-300)
        held = np.asarray(state.factored_damping[i])
        if bool(state.cholesky[i]) and np.asarray(lam).astype(held.dtype) != held:
            raise ValueError(
                f"The Cholesky factor of block {name!r} holds damping={float(state.factored_damping[i]):.3g}, but "
                f"the state says damping={float(lam):.3g}. Change damping with jaxinf.solvers.direct.with_damping."
            )
        if not small > tol:
            raise ValueError(
                f"The damped curvature of block {name!r} is singular: smallest |eigenvalue| "
                f"{small:.3g} against largest {top:.3g} (damping={float(lam):.3g}). "
                f"Set damping > 0, e.g. damping={max(1e-3 * top, 1e-8):.3g}."
            )
        shifted = np.asarray(w, np.float64) + float(lam)
        negative = 0 if bool(state.cholesky[i]) else int(np.sum(shifted < -tol))
        if negative:
            warnings.warn(
                f"C + λI of block {name!r} has {negative} negative eigenvalue(s) (most negative "
                f"{np.min(shifted):.3g}); the solve is exact, but influence under an indefinite "
                "curvature can flip signs. Consider curvature='gauss_newton' or a larger damping.",
                stacklevel=3,
            )


def bind(state: DirectState, operator: CurvatureOperator) -> DirectState:
    """``state`` with the damping of ``operator`` (per block), after checking it was fitted for that layout."""
    if state.spec != operator.spec or tuple(state.block_names) != tuple(operator.block_names):
        raise ValueError(
            "The direct() state was fitted for another parameter layout or block structure than the operator "
            f"(blocks {list(state.block_names)} against {list(operator.block_names)}); fit it with "
            "solver.init(operator), or pass state=None."
        )
    damping = tuple(operator.damping[operator.block_leaf_indices(b)[0]] for b in range(operator.num_blocks))
    return redamped(state, damping)


def redamped(state: DirectState, damping: tuple) -> DirectState:
    """``state`` at per-block ``damping``: ``eigh`` blocks as they are, Cholesky blocks refactorised if it changed.

    ``L'L'ᵀ = (L Lᵀ − λ⁰I) + λ'I`` under ``lax.cond`` (no work when ``λ' = λ⁰``), with the state's
    ``factorization`` rule (``"auto"``: a block that is no longer positive definite moves to ``eigh``).
    """
    if state.factorization == "eigh":
        return dataclasses.replace(state, damping=tuple(damping))
    parts = []
    for i, lam in enumerate(damping):
        held = (state.factors[i], state.eigvals[i], state.cholesky[i], state.factored_damping[i], state.bounds[i])
        low, lam0 = held[0], held[3]
        new = jax.lax.stop_gradient(jnp.asarray(lam).astype(low.dtype))

        def refactor(low=low, lam0=lam0, new=new):
            undamped = low @ low.T - lam0 * jnp.eye(low.shape[0], dtype=low.dtype)
            return factor_block(0.5 * (undamped + undamped.T), new, state.factorization)

        parts.append(jax.lax.cond(held[2] & (new != lam0), refactor, lambda held=held: held))
    fields = (tuple(part[k] for part in parts) for k in range(5))
    out = dataclasses.replace(state, damping=tuple(damping), **dict(
        zip(("factors", "eigvals", "cholesky", "factored_damping", "bounds"), fields)))
    _check_cholesky(out)
    return out


def with_damping(state: DirectState, damping: Any) -> DirectState:
    """The same fit with a new scalar damping: free for ``eigh`` blocks, one Cholesky for Cholesky blocks."""
    value = jnp.asarray(damping)
    return redamped(state, tuple(value for _ in state.damping))
