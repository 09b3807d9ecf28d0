"""Mixed precision (issue 13): bfloat16/float16 parameters, float32 linear algebra (jaxinf.core.precision).

Reference: the same MLP (same values, rounded to bfloat16 once) with float32
parameters. bfloat16 keeps 8 significant bits (relative rounding 2⁻⁸ ≈ 4e-3)
in every forward/backward/tangent pass, so the gradients and curvature
products carry errors of about 1e-2 relative; the scores inherit them.
Measured on this problem (Gauss-Newton, λ = 0.1, 4 × 20 scores; float32
reference), Pearson / Spearman / relative error: direct 0.9999 / 0.9994 /
1.2e-2, lissa 0.9999 / 0.9996 / 1.3e-2, arnoldi(10) 0.9986 / 0.9969 / 5.6e-2,
nystrom(10) 0.9999 / 0.9993 / 1.6e-2, ekfac 1.0000 / 0.9996 / 8e-3,
kfac 1.0000 / 0.9996 / 7e-3. The asserted bounds (Pearson ≥ 0.99,
Spearman ≥ 0.98, relative error ≤ 0.1) leave room for rounding-order changes
yet fail for a wrong dtype path (a bfloat16 factorisation or accumulation
loses the ranking: Spearman ~0.9 or an error).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import jaxinf
from jaxinf.core.precision import (
    InCompute,
    accumulate_dtype,
    check_accumulate_dtype,
    compute_dtype,
    promote,
)
from tests import models

SOLVERS = {
    "direct": lambda: jaxinf.direct(),
    "cg": lambda: jaxinf.cg(),
    "lissa": lambda: jaxinf.lissa(rtol=3e-2),  # rtol is a relative residual, and bfloat16 products err by ~1e-2
    "arnoldi": lambda: jaxinf.arnoldi(10),
    "nystrom": lambda: jaxinf.nystrom(10),
    "ekfac": lambda: jaxinf.ekfac(),
    "kfac": lambda: jaxinf.kfac(),
}


def _problem(dtype):
    return models.mlp_problem("plain", dtype=dtype, n_train=20, n_test=4, hidden=8)


def _fit(dtype, solver):
    p = _problem(dtype)
    model = jaxinf.InfluenceModel(
        p.loss_fn, p.params, solver, damping=0.1, curvature="gauss_newton", model_fn=p.model_fn,
        output_loss=p.output_loss,
    )
    return p, model.fit(p.train)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_bfloat16_params_score_like_float32(name):
    p16, m16 = _fit(jnp.bfloat16, SOLVERS[name]())
    s16 = m16.influences(p16.test, p16.train)
    p32, m32 = _fit(jnp.float32, SOLVERS[name]())
    s32 = m32.influences(p32.test, p32.train)
    assert s16.dtype == jnp.float32 and s16.shape == (4, 20)
    assert bool(jnp.all(jnp.isfinite(s16)))
    assert m16.operator.dtype == jnp.float32 and m16.operator.compute_dtype == jnp.bfloat16
    # the solver's arrays are float32; bfloat16 only in the training data it holds, float64 only in scalars (damping)
    data_shapes = {x.shape for x in jax.tree.leaves(p16.train)}
    floats = [x for x in jax.tree.leaves(m16.state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert all(x.shape in data_shapes for x in floats if x.dtype == jnp.bfloat16)
    assert all(x.size <= 1 for x in floats if x.dtype == jnp.float64)
    assert any(x.dtype == jnp.float32 and x.size > 20 for x in floats) or name == "cg"
    a, b = np.asarray(s16, np.float64).ravel(), np.asarray(s32, np.float64).ravel()
    pearson, spearman = scipy.stats.pearsonr(a, b)[0], scipy.stats.spearmanr(a, b)[0]
    assert pearson >= 0.99 and spearman >= 0.98, (name, pearson, spearman)
    assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(b)


def test_self_influence_factors_and_jvp_scoring_in_bfloat16():
    p, model = _fit(jnp.bfloat16, jaxinf.direct())
    factors = model.influence_factors(p.test)
    assert {x.dtype for x in jax.tree.leaves(factors)} == {jnp.dtype(jnp.float32)}
    self_inf = model.self_influence(p.train)
    assert self_inf.dtype == jnp.float32 and bool(jnp.all(self_inf > 0))  # PD curvature: positive
    full = model.influences(p.test, p.train)
    model.scoring = "jvp"  # the tangent is cast down to bfloat16 inside the model
    jvp = model.influences(p.test, p.train)
    assert jvp.dtype == jnp.float32
    np.testing.assert_allclose(jvp, full, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(full))))


def test_direct_dense_curvature_is_float32_and_matches_the_float32_model():
    p16, m16 = _fit(jnp.bfloat16, jaxinf.direct())
    p32, m32 = _fit(jnp.float32, jaxinf.direct())
    dense16 = jaxinf.core.curvature.to_dense(m16.operator)
    dense32 = jaxinf.core.curvature.to_dense(m32.operator)
    assert dense16.dtype == jnp.float32
    np.testing.assert_allclose(dense16, dense32, atol=0.03 * float(jnp.max(jnp.abs(dense32))))


def test_wrapped_loss_runs_the_model_in_bfloat16_and_returns_float32():
    p = _problem(jnp.bfloat16)
    seen = []

    def loss(params, batch):
        seen.append({x.dtype for x in jax.tree.leaves(params)})
        return p.loss_fn(params, batch)

    master, wrapped = promote(p.params, loss)
    assert isinstance(wrapped, InCompute) and {x.dtype for x in jax.tree.leaves(master)} == {jnp.dtype(jnp.float32)}
    grads = jax.jit(jax.grad(wrapped))(master, p.train)
    assert seen == [{jnp.dtype(jnp.bfloat16)}]  # the model itself ran in bfloat16
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert promote(master, loss) == (master, loss)  # float32 parameters: nothing changes
    assert wrapped == promote(p.params, loss)[1]  # equal (hashable) wrappers: models share compiled programs
    assert hash(wrapped) == hash(promote(p.params, loss)[1])


def test_precision_policy():
    half = {"w": jnp.ones(3, jnp.bfloat16)}
    assert compute_dtype(half) == jnp.bfloat16 and accumulate_dtype(half) == jnp.float32
    assert accumulate_dtype({"w": jnp.ones(3, jnp.float16)}) == jnp.float32
    assert accumulate_dtype({"w": jnp.ones(3)}) == jnp.float64  # conftest: x64
    assert accumulate_dtype(half, jnp.float64) == jnp.float64  # requested, x64 on
    with pytest.raises(ValueError, match=r"accumulate=bfloat16 is too narrow.*jnp.float32"):
        accumulate_dtype(half, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"factor_dtype=float16 is too narrow"):
        check_accumulate_dtype(jnp.float16, "factor_dtype")
    with pytest.raises(ValueError, match="narrower than the float64 parameters"):
        accumulate_dtype({"w": jnp.ones(3)}, jnp.float32)
    with pytest.raises(ValueError, match="must be a float dtype"):
        check_accumulate_dtype("not a dtype")
    for factory in (jaxinf.kfac, jaxinf.ekfac):  # was a raw NotImplementedError from the eigensolver at fit time
        with pytest.raises(ValueError, match=r"factor_dtype=bfloat16 is too narrow"):
            factory(factor_dtype=jnp.bfloat16)


def test_mixed_half_and_float32_leaves_are_still_refused():
    p = _problem(jnp.float32)
    mixed = dict(p.params, b1=p.params["b1"].astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="mix dtypes"):
        jaxinf.InfluenceModel(p.loss_fn, mixed, jaxinf.direct())


def test_scale_out_paths_refuse_half_precision_params_by_name():
    """The scale-out paths do not run the model through the precision policy yet: they refuse, naming the cast."""
    from jaxinf import scale

    p, model = _fit(jnp.bfloat16, jaxinf.cg())
    for where, call in [
        ("jaxinf.scale.fit", lambda: scale.fit(model, p.train, scale.data_mesh())),
        ("jaxinf.scale.InfluenceCalculator", lambda: scale.InfluenceCalculator(model)),
        ("jaxinf.scale.fit_from_stream",
         lambda: scale.fit_from_stream(jaxinf.cg(), p.loss_fn, p.params, scale.ArraySource(p.train, batch_size=5))),
    ]:
        with pytest.raises(ValueError, match=rf"{where} does not take bfloat16 params yet.*astype\(jnp.float32\)"):
            call()


def test_layer_breakdown_of_bfloat16_params_sums_to_the_influences():
    p, model = _fit(jnp.bfloat16, jaxinf.direct())
    parts = jaxinf.influences_by_layer(model, p.test, p.train)
    scores = model.influences(p.test, p.train)
    assert all(v.dtype == jnp.float32 for v in parts.values())
    # the layer contraction runs the bfloat16 model: agreement to bfloat16's rounding (2^-8), not float32's
    np.testing.assert_allclose(sum(parts.values()), scores, atol=3e-2 * float(jnp.max(jnp.abs(scores))))
