"""K-FAC and EK-FAC: Kronecker-factored inverse curvature, layer by layer.

For a layer ``s = W a`` (bias as an appended 1 in ``a``) the curvature block
of the weights is approximated by a Kronecker product (Martens & Grosse 2015;
convolutions: Grosse & Martens 2016; repeated layers summed over locations)::

    C_W ≈ A ⊗ G,   A = E[Σ_t a_t a_tᵀ],   G = E[(1/T) Σ_t g_t g_tᵀ],

with ``t`` over the ``T`` locations of the layer (positions of a
convolution, steps of a ``lax.scan``, uses of a shared weight) and ``g`` the
gradient with respect to the layer output. With ``A = Q_A diag(λ_A) Q_Aᵀ``
and ``G = Q_G diag(λ_G) Q_Gᵀ``, the solve is::

    (C_W + λI)⁻¹ v = Q_A [ (Q_Aᵀ V Q_G) / (Λ + λ) ] Q_Gᵀ,

where ``V`` is ``v`` as a ``(d_in+1, d_out)`` matrix and ``Λ = λ_A λ_Gᵀ``
(K-FAC). EK-FAC (George et al. 2018) keeps the Kronecker eigenbasis but
replaces ``Λ`` by the second moments of the per-example gradients in that
basis, ``Λ = E[(Q_Aᵀ ∇_W ℓ_i Q_G)²]`` (elementwise square), which is the
best diagonal in that basis in Frobenius norm. Parameters outside any tagged
layer get a diagonal or an exact small block of the same curvature
(:mod:`jaxinf.layers` decides and reports which).

Which curvature (the ``fisher`` option):

* ``"sampled"`` — the true Fisher / Monte-Carlo Gauss-Newton: output
  gradients of ``r ~ N(0, H_out)``, ``H_out`` the Hessian of the per-example
  output loss (or labels drawn from the model with ``likelihood=``), so
  ``E[g gᵀ]`` is the Gauss-Newton factor in expectation.
* ``"exact"`` — the Gauss-Newton in the factors without sampling noise: one
  backward pass per column of ``H_out^{1/2}`` (one per model output).
* ``"empirical"`` — gradients of the loss at the true labels (empirical
  Fisher).
* ``"auto"`` (default) — ``"empirical"`` for an operator of kind
  ``"fisher"``, else ``"sampled"`` when the output loss is known (the
  operator's or the factory's ``model_fn`` and ``output_loss``, or a
  ``likelihood``), else ``"empirical"``.

Damping: ``λ`` is the operator's damping of the layer's weight leaf. Where
that is zero, the layer gets ``damping_heuristic × mean(Λ)`` (default 0.1, as
in kronfluence); a positive operator damping always wins, and
``damping_heuristic=None`` keeps zero damping (``validate`` then reports a
singular layer).

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored
  approximate Fisher matrix for convolution layers", ICML 2016. George,
  Laurent, Bouthillier, Ballas & Vincent, "Fast Approximate Natural Gradient
  Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018. Grosse et al.,
  "Studying Large Language Model Generalization with Influence Functions",
  2023 (EK-FAC for influence).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.core.curvature import CurvatureOperator, per_example_grads
from jaxinf.core.data import Batches, add_example_axis, batch_size
from jaxinf.core.tree import TreeSpec, check_matches
from jaxinf.layers import LayerTags, Tracer, trace_layers
from jaxinf.layers.statistics import example_statistics, layer_matrices, rest_matrix
from jaxinf.scoring.layerwise import contract_by_layer
from jaxinf.solvers.base import Scorer, Solver, make_info

PyTree = Any
FISHER_MODES = ("auto", "sampled", "exact", "empirical")
LIKELIHOODS = (None, "categorical", "gaussian")
MAX_EXACT_OUTPUTS = 4096
EXAMPLE_CHUNK = 128  # examples whose EK-FAC pass-2 temporaries are formed at once


# ----------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class KFACPlan:
    """Static part of a K-FAC state: the traced layers and the configuration."""

    fit: Tracer  # the function whose output gradients build the factors
    score: Tracer  # the loss, for training-side scores
    loss_fn: Callable
    fisher: str
    likelihood: str | None
    num_samples: int
    update_diagonal: bool
    spec: TreeSpec
    factor_dtype: Any
    kind: str  # operator curvature kind, for the report

    @property
    def tags(self) -> LayerTags:
        return self.fit.tags


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class KFACState:
    """Fitted Kronecker factors, eigenbases and eigenvalues, per tagged layer.

    Per layer ``l`` (in ``plan.tags.layers`` order): ``factors_a[l]`` ``A``
    ``(d_in+1, d_in+1)``, ``factors_g[l]`` ``G`` ``(d_out, d_out)``, their
    eigenvectors ``eigvecs_a[l]``, ``eigvecs_g[l]``, the eigenvalues
    ``eigvals[l]`` ``(d_in+1, d_out)`` used by the solve (EK-FAC corrected or
    ``λ_A λ_Gᵀ``) and the effective damping ``damping[l]``. Per fallback leaf
    (``plan.tags.fallbacks`` order): eigenvectors (``None`` for a diagonal),
    eigenvalues and damping. ``plan`` (static) holds the traced layers;
    ``print(state.plan.tags)`` shows the report.
    """

    factors_a: tuple
    factors_g: tuple
    eigvecs_a: tuple
    eigvecs_g: tuple
    eigvals: tuple
    damping: tuple
    fallback_vecs: tuple
    fallback_vals: tuple
    fallback_damping: tuple
    plan: KFACPlan

    def tree_flatten(self):
        children = (
            self.factors_a,
            self.factors_g,
            self.eigvecs_a,
            self.eigvecs_g,
            self.eigvals,
            self.damping,
            self.fallback_vecs,
            self.fallback_vals,
            self.fallback_damping,
        )
        return children, (self.plan,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def tags(self) -> LayerTags:
        return self.plan.tags


# ----------------------------------------------------------------------------
# Per-example layer statistics
# ----------------------------------------------------------------------------


def _output_cotangents(plan: KFACPlan, output_loss, outs, batch1, key):
    """Cotangents ``r`` (leading axis K) at the traced function's outputs, pre-scaled by √weight."""
    tracer = plan.fit
    if plan.fisher == "empirical":
        return [jnp.ones((1, *o.shape), o.dtype) for o in outs], 1
    flat = jnp.concatenate([jnp.ravel(o) for o in outs])
    shapes = [o.shape for o in outs]
    sizes = [math.prod(s) for s in shapes]

    def split(vec):
        parts, start = [], 0
        for s, n in zip(shapes, sizes):
            parts.append(jnp.reshape(vec[..., start : start + n], (*vec.shape[:-1], *s)))
            start += n
        return parts

    m = flat.shape[0]
    s_count = plan.num_samples
    if plan.fisher == "sampled" and plan.likelihood == "categorical":
        logits = outs[0]
        probs = jax.nn.softmax(logits, axis=-1)
        labels = jax.random.categorical(key, logits, axis=-1, shape=(s_count, *logits.shape[:-1]))
        r = (probs[None] - jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)) / math.sqrt(s_count)
        return [r], s_count
    if plan.fisher == "sampled" and plan.likelihood == "gaussian":
        eps = jax.random.normal(key, (s_count, m), flat.dtype) / math.sqrt(s_count)
        return split(eps), s_count
    if plan.likelihood == "gaussian":  # exact, H_out = I
        return split(jnp.eye(m, dtype=flat.dtype)), m

    if plan.likelihood == "categorical":

        def nll(vec):
            logits = split(vec)[0]
            return -jnp.sum(jax.nn.log_softmax(logits, axis=-1)[..., 0])

    else:

        def nll(vec):
            return output_loss(jax.tree.unflatten(tracer.out_tree, split(vec)), batch1)

    hess = jax.hessian(nll)(flat)
    hess = 0.5 * (hess + hess.T)
    w, u = jnp.linalg.eigh(hess)
    root = u * jnp.sqrt(jnp.clip(w, 0.0))[None, :]  # H = root rootᵀ
    if plan.fisher == "exact":
        return split(root.T), m
    eps = jax.random.normal(key, (s_count, m), flat.dtype) / math.sqrt(s_count)
    return split(eps @ root.T), s_count


def _weighted_sum(fn: Callable, data: Batches):
    """``Σ_b (n_b / n) fn(batch_b, b)`` (the pattern of :func:`jaxinf.core.data.weighted_mean`, plus a batch index)."""
    n = data.num_examples
    total, offset = None, 0
    if data.stacked is not None:
        k = np.shape(jax.tree.leaves(data.stacked)[0])[0]
        first = jax.tree.map(lambda a: a[0], data.stacked)
        weight = batch_size(first) / n
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first, 0))

        def body(acc, xs):
            batch, i = xs
            return jax.tree.map(lambda s, t: s + weight * t, acc, fn(batch, i)), None

        total, _ = jax.lax.scan(body, zero, (data.stacked, jnp.arange(k)))
        offset = k
    for j, b in enumerate(data.rest):
        weight = batch_size(b) / n
        term = jax.tree.map(lambda t, w=weight: w * t, fn(b, offset + j))
        total = term if total is None else jax.tree.map(jnp.add, total, term)
    return total


# ----------------------------------------------------------------------------
# The factory
# ----------------------------------------------------------------------------


def ekfac(
    *,
    update_diagonal: bool = True,
    fisher: str = "auto",
    likelihood: str | None = None,
    num_samples: int = 1,
    model_fn: Callable | None = None,
    output_loss: Callable | None = None,
    damping_heuristic: float | None = 0.1,
    factor_dtype: Any = None,
    block_max_size: int = 256,
) -> Solver:
    """EK-FAC (or, with ``update_diagonal=False``, K-FAC) on automatically tagged layers.

    Solves ``(C + λI) x = v`` with ``C`` replaced, layer by layer, by
    ``(Q_A ⊗ Q_G) diag(Λ) (Q_A ⊗ Q_G)ᵀ`` (see the module docstring), and
    fallback leaves by a diagonal or exact block. ``init`` fits the factors
    over ``operator.data`` (size-weighted over batches); ``solve`` costs two
    small matrix products per layer.

    Args:
      update_diagonal: EK-FAC's eigenvalue correction
        ``Λ = E[(Q_Aᵀ ∇_W ℓ_i Q_G)²]`` (one more pass over the data); ``False``
        gives K-FAC's ``Λ = λ_A λ_Gᵀ``.
      fisher: ``"auto"``, ``"sampled"``, ``"exact"`` or ``"empirical"``; see the
        module docstring.
      likelihood: how ``"sampled"`` draws output gradients: ``None`` (Gaussian
        with the covariance ``H_out`` of the output loss), ``"categorical"``
        (labels drawn from ``softmax(outputs)``, the outputs being logits) or
        ``"gaussian"`` (``y ~ N(outputs, I)``). With a likelihood, the output
        loss is not needed.
      num_samples: draws per example for ``"sampled"``.
      model_fn, output_loss: ``model_fn(params, batch) -> outputs`` and
        ``output_loss(outputs, batch) -> mean loss``, overriding the
        operator's (needed for ``"sampled"``/``"exact"`` with an operator of
        kind ``"hessian"`` or ``"fisher"``).
      damping_heuristic: where the operator's damping is zero, use this times
        the mean eigenvalue of the layer (or fallback block); ``None``: never.
      factor_dtype: dtype for accumulating and eigendecomposing the factors
        (e.g. ``jnp.float64`` with float32 parameters; needs
        ``jax_enable_x64``); default: the parameters' dtype.
      block_max_size: fallback leaves up to this many entries get an exact
        block, larger ones a diagonal.

    Returns:
      A :class:`jaxinf.Solver` with ``score`` (layer-wise influence scores).

    Raises:
      ValueError: on a bad option (at once) or, from ``init``, when the
        chosen Fisher needs an output loss the operator does not have.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxinf
      >>> x = jax.random.normal(jax.random.key(0), (8, 3)); y = x @ jnp.ones((3, 1))
      >>> params = {"w": jnp.zeros((3, 1)), "b": jnp.zeros(1)}
      >>> model = lambda p, b: b[0] @ p["w"] + p["b"]
      >>> mse = lambda out, b: 0.5 * jnp.mean(jnp.sum((out - b[1]) ** 2, -1))
      >>> op = jaxinf.curvature_operator(None, params, (x, y), kind="gauss_newton",
      ...                                model_fn=model, output_loss=mse, damping=0.1)
      >>> solver = jaxinf.ekfac(fisher="exact")
      >>> state = solver.init(op)
      >>> [(path, treatment) for path, _, treatment, _ in state.tags.rows()]
      [("['b']", 'dense bias (auto)'), ("['w']", 'dense weight (auto)')]
      >>> sol, info = solver.solve(state, params)
      >>> bool(info.converged)
      True

    References:
      George et al., NeurIPS 2018 (EK-FAC); Martens & Grosse, ICML 2015
      (K-FAC); Grosse & Martens, ICML 2016 (convolutions).
    """
    if fisher not in FISHER_MODES:
        raise ValueError(f"Unknown fisher={fisher!r}; choose one of {FISHER_MODES}.")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"Unknown likelihood={likelihood!r}; choose None, 'categorical' or 'gaussian'.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
    if damping_heuristic is not None and not (np.isfinite(damping_heuristic) and damping_heuristic >= 0):
        raise ValueError(f"damping_heuristic must be >= 0 or None, got {damping_heuristic!r}.")
    if block_max_size < 0:
        raise ValueError(f"block_max_size must be >= 0, got {block_max_size}.")
    if factor_dtype is not None and not jnp.issubdtype(jnp.dtype(factor_dtype), jnp.floating):
        raise ValueError(f"factor_dtype must be a float dtype such as jnp.float64, got {factor_dtype!r}.")
    if (model_fn is None) != (output_loss is None) and likelihood is None:
        raise ValueError("Give both model_fn and output_loss (or model_fn with a likelihood), not one of them.")

    def make_plan(operator: CurvatureOperator) -> tuple[KFACPlan, Callable | None]:
        m_fn = model_fn or operator.model_fn
        o_loss = output_loss or operator.output_loss
        mode = fisher
        knows_output = m_fn is not None and (o_loss is not None or likelihood is not None)
        if mode == "auto":
            mode = "empirical" if operator.kind == "fisher" or not knows_output else "sampled"
        if mode in ("sampled", "exact") and not knows_output:
            raise ValueError(
                f"ekfac(fisher={mode!r}) needs the model outputs and the output loss: build the operator with "
                "curvature='gauss_newton' (model_fn, output_loss), or pass ekfac(model_fn=..., output_loss=...) "
                "or ekfac(model_fn=..., likelihood='categorical'|'gaussian'); or use fisher='empirical'."
            )
        loss_fn = operator.loss_fn
        if loss_fn is None:
            mf, ol = operator.model_fn, operator.output_loss

            def loss_fn(p, batch):
                return ol(mf(p, batch), batch)

        dtype = jnp.dtype(factor_dtype) if factor_dtype is not None else jnp.dtype(operator.dtype)
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError(
                "factor_dtype=float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) first."
            )
        example = next(operator.data.batches())
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), operator.params)
        fit_fn = loss_fn if mode == "empirical" else m_fn
        fit = trace_layers(fit_fn, shapes, example, block_max_size=block_max_size)
        if mode == "empirical":
            score = fit
        else:
            score = trace_layers(loss_fn, shapes, example, block_max_size=block_max_size, restrict_to=fit.tags)
        if mode != "empirical":
            out_size = sum(math.prod(a.shape) for a in fit.out_avals)
            if out_size > MAX_EXACT_OUTPUTS and (mode == "exact" or likelihood is None):
                raise ValueError(
                    f"The model has {out_size} outputs per example; forming the output-loss Hessian is too costly. "
                    "Use fisher='sampled' with likelihood='categorical' or 'gaussian', or fisher='empirical'."
                )
        plan = KFACPlan(
            fit,
            score,
            loss_fn,
            mode,
            likelihood,
            int(num_samples),
            update_diagonal,
            operator.spec,
            dtype,
            operator.kind,
        )
        return plan, o_loss

    def init(operator: CurvatureOperator, *, key=None) -> KFACState:
        plan, o_loss = make_plan(operator)
        key = jax.random.key(0) if key is None else key
        return jax.jit(lambda op, k: _fit(plan, o_loss, op, k, damping_heuristic))(operator, key)

    def stream_init(stream, *, key=None) -> KFACState:
        """The same state from a stream: pass 1 (and, for EK-FAC, pass 2) as host loops over its batches."""
        plan, o_loss = make_plan(stream.operator)
        key = jax.random.key(0) if key is None else key
        return _fit_stream(plan, o_loss, stream, key, damping_heuristic)

    def solve(state: KFACState, v):
        check_matches(v, state.plan.spec, "v")
        return _solve(state, v)

    def validate(state: KFACState) -> None:
        _validate(state)

    name = "ekfac" if update_diagonal else "kfac"
    advice = "Increase damping (or damping_heuristic); check the tagging report (print(state.tags))."
    return Solver(
        init=init,
        solve=solve,
        validate=validate,
        name=name,
        advice=advice,
        scorer=Scorer(prepare=prepare_scores, finish=finish_scores),
        stream_init=stream_init,
    )


def kfac(**kwargs) -> Solver:
    """K-FAC: :func:`ekfac` without the eigenvalue correction (``Λ = λ_A λ_Gᵀ``).

    Takes the same keyword options as :func:`ekfac` (except
    ``update_diagonal``).

    Examples:
      >>> import jaxinf
      >>> jaxinf.kfac(fisher="exact").name
      'kfac'
    """
    if "update_diagonal" in kwargs:
        raise ValueError("kfac() has no update_diagonal option; use ekfac(update_diagonal=...) instead.")
    return ekfac(update_diagonal=False, **kwargs)


# ----------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------


def _batch_key(key, index):
    return jax.random.fold_in(key, index)


def _batch_statistics(plan: KFACPlan, output_loss, params_leaves, batch, key, indices=None):
    """Per example of ``batch`` (vmapped): records, output gradients, rest gradients.

    Example ``i`` draws with ``fold_in(key, indices[i])`` (default: its position ``i``).
    """
    tracer = plan.fit
    indices = jnp.arange(batch_size(batch)) if indices is None else indices
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)

    def one(example, k):
        batch1 = add_example_axis(example)
        return example_statistics(
            tracer, params_leaves, batch1, lambda outs, b1: _output_cotangents(plan, output_loss, outs, b1, k)
        )

    return jax.vmap(one)(batch, keys)


def _pass1(plan: KFACPlan, output_loss, params_leaves, batch, key) -> dict:
    """Pass 1 on one batch (``key`` already folded with its index): mean ``A``, ``G`` and fallback statistics."""
    tags = plan.tags
    dtype = plan.factor_dtype
    records, pert, diff = _batch_statistics(plan, output_loss, params_leaves, batch, key)
    n = batch_size(batch)
    out = {"A": [], "G": [], "F": []}
    for layer in tags.layers:
        a, g = jax.vmap(lambda r, p, L=layer: layer_matrices(L, r, p, dtype))(records, pert)
        t = a.shape[1]
        out["A"].append(jnp.einsum("nti,ntj->ij", a, a) / n)
        out["G"].append(jnp.einsum("nkto,nktp->op", g, g) / (n * t))
    for fb in tags.fallbacks:
        gl = jnp.reshape(diff[fb.leaf], (n, -1, math.prod(tags.shapes[fb.leaf]))).astype(dtype)
        if fb.method == "block":
            out["F"].append(jnp.einsum("nki,nkj->ij", gl, gl) / n)
        else:
            out["F"].append(jnp.sum(gl * gl, axis=(0, 1)) / n)
    return out


def _eigenbases(stats: dict) -> tuple:
    """Eigendecompositions of the summed ``A`` and ``G``: ``(λ_A, Q_A, λ_G, Q_G)``, lists per layer."""
    eig_a, vec_a, eig_g, vec_g = [], [], [], []
    for a, g in zip(stats["A"], stats["G"]):
        wa, qa = jnp.linalg.eigh(0.5 * (a + a.T))
        wg, qg = jnp.linalg.eigh(0.5 * (g + g.T))
        eig_a.append(jnp.clip(wa, 0.0))
        vec_a.append(qa)
        eig_g.append(jnp.clip(wg, 0.0))
        vec_g.append(qg)
    return eig_a, vec_a, eig_g, vec_g


def _sum_in_chunks(fn: Callable, batch, chunk: int):
    """``Σ fn(part, indices)`` over parts of ``batch`` of ``chunk`` examples, in a ``lax.map``.

    Bounds the per-example temporaries to ``chunk`` examples. Part ``j`` holds
    the examples ``j, j + s, j + 2s, ...`` (``s`` parts), so a batch sharded
    along its examples stays sharded in every part; ``indices`` are the
    examples' positions in ``batch``. Examples past the last full part are
    summed after the map.
    """
    n = batch_size(batch)
    steps = n // chunk
    if steps < 2:
        return fn(batch, jnp.arange(n))
    m = steps * chunk
    parts = jax.tree.map(lambda a: jnp.swapaxes(a[:m].reshape(chunk, steps, *a.shape[1:]), 0, 1), batch)
    indices = jnp.arange(m).reshape(chunk, steps).T
    total = jax.tree.map(lambda t: jnp.sum(t, axis=0), jax.lax.map(lambda xs: fn(*xs), (parts, indices)))
    if m < n:
        rest = fn(jax.tree.map(lambda a: a[m:], batch), jnp.arange(m, n))
        total = jax.tree.map(jnp.add, total, rest)
    return total


def _pass2(plan: KFACPlan, output_loss, params_leaves, vec_a, vec_g, batch, key) -> list:
    """EK-FAC pass 2 on one batch: mean ``(Q_Aᵀ ∇_W ℓ_i Q_G)²`` per layer.

    Called with the same ``key`` as :func:`_pass1` for this batch: ``Λ`` is then
    exactly the diagonal of the same estimate in the eigenbasis. The rotated
    per-example gradients (``d_in+1 × d_out`` per example and layer) are formed
    :data:`EXAMPLE_CHUNK` examples at a time.
    """
    dtype = plan.factor_dtype

    def sums(part, indices):
        records, pert, diff = _batch_statistics(plan, output_loss, params_leaves, part, key, indices)
        out = []
        for layer, qa, qg in zip(plan.tags.layers, vec_a, vec_g):

            def rotated(r, p, d, L=layer, qa=qa, qg=qg):
                a, g = layer_matrices(L, r, p, dtype)
                m = jnp.einsum("ti,kto->kio", a @ qa, g @ qg)
                rest = rest_matrix(L, d, dtype)
                if rest is not None:
                    m = m + jnp.einsum("ij,kjl,lo->kio", qa.T, rest, qg)
                return jnp.sum(m * m, axis=0)

            out.append(jnp.sum(jax.vmap(rotated)(records, pert, diff), axis=0))
        return out

    n = batch_size(batch)
    return [t / n for t in _sum_in_chunks(sums, batch, EXAMPLE_CHUNK)]


def _finish(plan: KFACPlan, stats: dict, bases: tuple, corrected, operator_damping, heuristic) -> KFACState:
    """The state from the summed statistics, the eigenbases and (EK-FAC) the corrected eigenvalues."""
    tags = plan.tags
    dtype = plan.factor_dtype
    eig_a, vec_a, eig_g, vec_g = bases
    if plan.update_diagonal:
        eigvals = list(corrected) if tags.layers else []
    else:
        eigvals = [wa[:, None] * wg[None, :] for wa, wg in zip(eig_a, eig_g)]

    def effective(leaf, values):
        lam = operator_damping[leaf].astype(dtype)
        if heuristic is None:
            return lam
        return jnp.where(lam > 0, lam, heuristic * jnp.mean(values))

    damping = tuple(effective(layer.weight, ev) for layer, ev in zip(tags.layers, eigvals))
    fb_vecs, fb_vals, fb_damp = [], [], []
    for fb, f in zip(tags.fallbacks, stats["F"]):
        if fb.method == "block":
            w, q = jnp.linalg.eigh(0.5 * (f + f.T))
            fb_vecs.append(q)
            fb_vals.append(jnp.clip(w, 0.0))
        else:
            fb_vecs.append(None)
            fb_vals.append(f)
        fb_damp.append(effective(fb.leaf, fb_vals[-1]))
    return KFACState(
        tuple(stats["A"]),
        tuple(stats["G"]),
        tuple(vec_a),
        tuple(vec_g),
        tuple(eigvals),
        damping,
        tuple(fb_vecs),
        tuple(fb_vals),
        tuple(fb_damp),
        plan,
    )


def _fit(plan: KFACPlan, output_loss, operator: CurvatureOperator, key, heuristic) -> KFACState:
    """The in-memory fit: both passes as :func:`_weighted_sum` sweeps of ``operator.data`` (inside one jit)."""
    params_leaves = jax.tree.leaves(operator.params)
    stats = _weighted_sum(
        lambda batch, index: _pass1(plan, output_loss, params_leaves, batch, _batch_key(key, index)), operator.data
    )
    bases = _eigenbases(stats)
    corrected = None
    if plan.update_diagonal and plan.tags.layers:
        _, vec_a, _, vec_g = bases
        corrected = _weighted_sum(
            lambda batch, index: _pass2(plan, output_loss, params_leaves, vec_a, vec_g, batch, _batch_key(key, index)),
            operator.data,
        )
    return _finish(plan, stats, bases, corrected, operator.damping, heuristic)


def _fit_stream(plan: KFACPlan, output_loss, stream, key, heuristic) -> KFACState:
    """The streamed fit: the passes of :func:`_fit` as host loops, one jitted call per batch.

    Each batch's statistics are added to a device-resident sum with weight
    ``n_b / n`` (as :func:`_weighted_sum` does), with the key of its batch
    index, so the state equals the in-memory fit on the same batches.
    Compiled once per batch shape (a ragged last batch compiles once more).
    """
    operator = stream.operator
    params_leaves = stream.replicate(jax.tree.leaves(operator.params))

    def first_pass(leaves, batch, k):
        return _pass1(plan, output_loss, leaves, batch, k)

    def second_pass(leaves, batch, k, vec_a, vec_g):
        return _pass2(plan, output_loss, leaves, vec_a, vec_g, batch, k)

    def run(fn, desc, *args):
        def step(total, leaves, batch, key, index, weight, *args):
            term = fn(leaves, batch, _batch_key(key, index), *args)
            return jax.tree.map(lambda s, t: s + weight * t, total, term)

        step = jax.jit(step, donate_argnums=0)
        total = stream.zeros(jax.eval_shape(fn, params_leaves, stream.first, key, *args))
        for index, batch, weight in stream.batches(desc):
            total = step(total, params_leaves, batch, key, index, weight, *args)
        return total

    passes = 2 if plan.update_diagonal and plan.tags.layers else 1
    stats = run(first_pass, f"K-FAC factors, pass 1/{passes}")
    bases = jax.jit(_eigenbases)(stats)
    corrected = None
    if passes == 2:
        _, vec_a, _, vec_g = bases
        corrected = run(second_pass, "EK-FAC eigenvalues, pass 2/2", vec_a, vec_g)
    finish = jax.jit(lambda s, b, c, d: _finish(plan, s, b, c, d, heuristic))
    return finish(stats, bases, corrected, operator.damping)


# ----------------------------------------------------------------------------
# Solving
# ----------------------------------------------------------------------------


def _inverse(values, damping):
    denom = values + damping
    safe = jnp.where(denom > 0, denom, 1.0)
    return jnp.where(denom > 0, 1.0 / safe, 0.0)


def _apply(state: KFACState, v: PyTree, power: int, damped: bool = True) -> PyTree:
    """``(K + λ)^power v`` with ``K`` the fitted approximation, for ``power`` in ``{1, -1}``."""
    tags = state.tags
    leaves, treedef = jax.tree.flatten(v)
    out = list(leaves)
    dtype = state.plan.factor_dtype
    for i, layer in enumerate(tags.layers):
        lam = state.damping[i] if damped else jnp.zeros((), dtype)
        vm = layer.to_matrix([x.astype(dtype) if x is not None else None for x in leaves])
        qa, qg = state.eigvecs_a[i], state.eigvecs_g[i]
        rot = qa.T @ vm @ qg
        scale = _inverse(state.eigvals[i], lam) if power < 0 else state.eigvals[i] + lam
        xm = qa @ (rot * scale) @ qg.T
        w, b = layer.from_matrix(xm, tags.shapes[layer.bias] if layer.bias is not None else None)
        out[layer.weight] = w.astype(leaves[layer.weight].dtype)
        if layer.bias is not None:
            out[layer.bias] = b.astype(leaves[layer.bias].dtype)
    for fb, q, vals, lam in zip(tags.fallbacks, state.fallback_vecs, state.fallback_vals, state.fallback_damping):
        lam = lam if damped else jnp.zeros_like(lam)
        x = jnp.ravel(leaves[fb.leaf]).astype(dtype)
        scale = _inverse(vals, lam) if power < 0 else vals + lam
        y = q @ ((q.T @ x) * scale) if q is not None else x * scale
        out[fb.leaf] = jnp.reshape(y, tags.shapes[fb.leaf]).astype(leaves[fb.leaf].dtype)
    return jax.tree.unflatten(treedef, out)


def _solve(state: KFACState, v):
    x = _apply(state, v, -1)
    back = _apply(state, x, 1)
    residual = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(v))))
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(x)]))
    return x, make_info(1, residual, finite, ~finite)


def approx_curvature_vp(state: KFACState, v: PyTree, *, damped: bool = False) -> PyTree:
    """``K v`` (or ``(K + λ) v``) with ``K`` the fitted K-FAC / EK-FAC curvature, for checks and diagnostics."""
    check_matches(v, state.plan.spec, "v")
    return _apply(state, v, 1, damped)


def _validate(state: KFACState) -> None:
    tags = state.tags
    items = [(layer.name, ev, lam) for layer, ev, lam in zip(tags.layers, state.eigvals, state.damping)]
    items += [
        (tags.paths[fb.leaf], vals, lam)
        for fb, vals, lam in zip(tags.fallbacks, state.fallback_vals, state.fallback_damping)
    ]
    for name, ev, lam in items:
        ev = np.asarray(ev, np.float64)
        lam = float(lam)
        if not np.all(np.isfinite(ev)) or not np.isfinite(lam):
            raise ValueError(
                f"The K-FAC factors of {name} contain NaN or inf: check the data, the parameters and the loss."
            )
        top = float(np.max(ev)) if ev.size else 0.0
        if top == 0.0 and lam == 0.0:
            continue  # unused parameter: zero gradient, solved as zero
        if lam == 0.0 and float(np.min(ev)) <= ev.size * np.finfo(np.float64).eps * top:
            raise ValueError(
                f"The (E)K-FAC curvature of {name} is singular (smallest eigenvalue {float(np.min(ev)):.3g}, largest "
                f"{top:.3g}) and its damping is 0. Set damping > 0 (e.g. {max(1e-3 * top, 1e-8):.3g}) or leave "
                "damping_heuristic on."
            )


# ----------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------


@jax.jit
def prepare_scores(state: KFACState, operator: CurvatureOperator, test_batch):
    """The test side of :func:`score`: factors ``(K + λ)⁻¹ ∇ℓ(test_i)`` (leading ``n_test``), once per test batch."""
    test_grads = per_example_grads(state.plan.loss_fn, operator.params, test_batch)
    return jax.vmap(_solve, in_axes=(None, 0))(state, test_grads)[0]


def _by_layer(state: KFACState, operator: CurvatureOperator, factors, train_batch) -> dict:
    plan = state.plan
    return contract_by_layer(plan.score, operator.params, factors, train_batch, dtype=plan.factor_dtype)


@jax.jit
def finish_scores(state: KFACState, operator: CurvatureOperator, factors, train_batch):
    """``(n_test, n_train)`` scores of a training batch against factors from :func:`prepare_scores`."""
    return sum(_by_layer(state, operator, factors, train_batch).values()).astype(state.plan.spec.dtype)


@jax.jit
def influences_by_layer(state: KFACState, operator: CurvatureOperator, test_batch, train_batch) -> dict:
    """Influence scores split by layer: ``{name: (n_test, n_train)}``, summing to :func:`score`.

    Keys are the layer names of ``state.tags`` and the paths of fallback
    leaves. Each term is ``Σ_l ⟨(K + λ)⁻¹ ∇ℓ(test_i), ∇ℓ(train_j)⟩`` restricted
    to that layer's parameters, contracted by :func:`jaxinf.scoring.layerwise.contract_by_layer`
    (per-example training gradients are formed only for layers where that is
    cheaper than contracting layer inputs and output gradients directly).
    """
    return _by_layer(state, operator, prepare_scores(state, operator, test_batch), train_batch)


@jax.jit
def score(state: KFACState, operator: CurvatureOperator, test_batch, train_batch):
    """``I[i, j] = ∇ℓ(test_i)ᵀ (K + λ)⁻¹ ∇ℓ(train_j)``, shape ``(n_test, n_train)``, contracted layer by layer."""
    return finish_scores(state, operator, prepare_scores(state, operator, test_batch), train_batch)


__all__ = [
    "FISHER_MODES",
    "KFACPlan",
    "KFACState",
    "approx_curvature_vp",
    "ekfac",
    "example_statistics",
    "finish_scores",
    "influences_by_layer",
    "kfac",
    "prepare_scores",
    "score",
]
