"""InfluenceModel against dense float64 references, invariants, leave-one-out, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core.curvature import to_dense
from tests import models

DAMPING = 1e-3


def _model(p, curvature="gauss_newton", damping=DAMPING, **kw):
    return jaxinf.InfluenceModel(
        p.loss_fn,
        p.params,
        jaxinf.direct(),
        damping=damping,
        curvature=curvature,
        model_fn=p.model_fn,
        output_loss=p.output_loss,
        **kw,
    )


def _reference(p, model, test, train):
    """Dense: G_test (C + λI)⁻¹ G_trainᵀ with C built independently of the solver."""
    dense = np.asarray(to_dense(model.operator))
    g_test = np.asarray(models.dense_grads(p.loss_fn, p.params, test))
    g_train = np.asarray(models.dense_grads(p.loss_fn, p.params, train))
    return g_test @ np.linalg.solve(dense, g_train.T)


def _reference_hessian(p, damping):
    h = np.asarray(models.dense_hessian(p.loss_fn, p.params, p.train))
    g_test = np.asarray(models.dense_grads(p.loss_fn, p.params, p.test))
    g_train = np.asarray(models.dense_grads(p.loss_fn, p.params, p.train))
    return g_test @ np.linalg.solve(h + damping * np.eye(h.shape[0]), g_train.T)


@pytest.mark.parametrize("flavour", ["linen", "nnx", "plain"])
def test_hessian_influences_match_jax_hessian_reference(flavour):
    p = models.mlp_problem(flavour)
    model = jaxinf.InfluenceModel(p.loss_fn, p.params, jaxinf.direct(), damping=0.5)
    with pytest.warns(UserWarning, match="negative eigenvalue"):  # an untrained MLP: indefinite Hessian
        model.fit(p.train)
    got = model.influences(p.test, p.train)
    assert got.shape == (5, 23)
    np.testing.assert_allclose(got, _reference_hessian(p, 0.5), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("curvature", ["gauss_newton", "fisher"])
def test_psd_curvature_influences_match_dense_reference(curvature):
    p = models.mlp_problem("nnx")
    model = _model(p, curvature).fit(p.train)
    got = model.influences(p.test, p.train)
    np.testing.assert_allclose(got, _reference(p, model, p.test, p.train), rtol=1e-8, atol=1e-10)


def test_cnn_influences_match_dense_reference():
    p = models.cnn_problem()
    model = _model(p).fit(p.train)
    np.testing.assert_allclose(
        model.influences(p.test, p.train), _reference(p, model, p.test, p.train), rtol=1e-8, atol=1e-10
    )


def test_influences_equal_influences_from_factors_for_both_scoring_paths():
    p = models.mlp_problem("linen")
    model = _model(p).fit(p.train)
    factors = model.influence_factors(p.test)
    assert jax.tree.leaves(factors)[0].shape[0] == 5
    whole = model.influences(p.test, p.train)
    np.testing.assert_allclose(model.influences_from_factors(factors, p.train), whole, rtol=1e-12, atol=1e-12)
    by_jvp = _model(p, scoring="jvp").fit(p.train).influences(p.test, p.train)
    np.testing.assert_allclose(by_jvp, whole, rtol=1e-10, atol=1e-12)


def test_a_named_scoring_method_is_used_with_a_solver_that_has_its_own_scorer():
    """``scoring="jvp"`` given to an Arnoldi or EK-FAC model was silently ignored: ``influences`` used the solver's
    scorer. A named method now replaces the scorer (here one that fails if called), with the scorer's numbers."""
    from jaxinf.solvers.base import Scorer

    def refuse(*_):
        raise AssertionError("the solver's own scorer ran although scoring was named")

    p = models.mlp_problem("linen")
    for solver in (jaxinf.arnoldi(6), jaxinf.ekfac()):
        own = jaxinf.InfluenceModel(p.loss_fn, p.params, solver, damping=DAMPING).fit(p.train)
        want = own.influences(p.test, p.train)  # scoring="auto": the solver's scorer
        for method in ("jvp", "gradients"):
            bypassed = solver._replace(scorer=Scorer(refuse, refuse))
            model = jaxinf.InfluenceModel(p.loss_fn, p.params, bypassed, damping=DAMPING, scoring=method)
            np.testing.assert_allclose(model.fit(p.train).influences(p.test, p.train), want, rtol=1e-8, atol=1e-12)


def test_symmetric_case_and_smaller_side_inversion():
    p = models.mlp_problem("plain")
    model = _model(p).fit(p.train)
    sym = model.influences(p.test)
    np.testing.assert_allclose(sym, model.influences(p.test, p.test), rtol=1e-12)
    np.testing.assert_allclose(sym, sym.T, rtol=1e-9, atol=1e-12)
    # 23 test points against 5 train points: the inverse is applied to the 5 (smaller) side.
    swapped = model.influences(p.train, p.test)
    np.testing.assert_allclose(swapped, model.influences(p.test, p.train).T, rtol=1e-9, atol=1e-12)


def test_self_influence_is_the_diagonal_and_positive_under_psd_curvature():
    p = models.mlp_problem("nnx")
    model = _model(p).fit(p.train)
    si = model.self_influence(p.train)
    np.testing.assert_allclose(si, jnp.diag(model.influences(p.train, p.train)), rtol=1e-9)
    assert bool(jnp.all(si > 0))


def test_perturbation_mode_matches_finite_differences():
    p = models.mlp_problem("plain")
    model = _model(p).fit(p.train)
    pert = model.influences(p.test, p.train, mode="perturbation")
    x, y = p.train
    assert pert.shape == (5, 23, x.shape[1])
    factors = model.influence_factors(p.test)
    eps = 1e-6
    j, k = 4, 2
    plus = model.influences_from_factors(factors, (x.at[j, k].add(eps), y))[:, j]
    minus = model.influences_from_factors(factors, (x.at[j, k].add(-eps), y))[:, j]
    np.testing.assert_allclose(pert[:, j, k], (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-8)


def test_perturbation_input_leaf_by_key_path():
    p = models.mlp_problem("plain")
    x, y = p.train

    def loss(params, batch):
        return p.loss_fn(params, (batch["image"], batch["target"]))

    train = {"image": x, "target": y}
    test = {"image": p.test[0], "target": p.test[1]}
    model = jaxinf.InfluenceModel(loss, p.params, jaxinf.direct(), damping=0.5, input_leaf="['image']")
    with pytest.warns(UserWarning):
        model.fit(train)
    assert model.influences(test, train, mode="perturbation").shape == (5, 23, 4)
    model.input_leaf = "['label']"
    with pytest.raises(ValueError, match="not a leaf of the batch"):
        model.influences(test, train, mode="perturbation")


def test_ragged_batches_everywhere_match_one_batch():
    p = models.mlp_problem("linen", n_train=23)
    x, y = p.train
    batches = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]
    one = _model(p).fit(p.train).influences(p.test, p.train)
    model = _model(p).fit(batches)
    scale = float(jnp.max(jnp.abs(one)))  # errors scale with the largest entry (cond(C + λI) · eps)
    np.testing.assert_allclose(model.influences(p.test, batches), one, rtol=1e-10, atol=1e-10 * scale)
    tests = [(p.test[0][:3], p.test[1][:3]), (p.test[0][3:], p.test[1][3:])]
    np.testing.assert_allclose(model.influences(tests, p.train), one, rtol=1e-10, atol=1e-10 * scale)


def test_float32_run_matches_float64_reference():
    p32 = models.mlp_problem("nnx", dtype=jnp.float32)
    p64 = models.mlp_problem("nnx", dtype=jnp.float64)
    got = _model(p32, damping=0.1).fit(p32.train).influences(p32.test, p32.train)
    assert got.dtype == jnp.float32
    model64 = _model(p64, damping=0.1).fit(p64.train)
    ref = _reference(p64, model64, p64.test, p64.train)
    assert np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref) < 1e-4


def test_assigning_damping_refits():
    p = models.logistic_problem()
    model = _model(p, damping=0.1).fit(p.train)
    before = model.influences(p.test, p.train)
    model.damping = 1.0
    after = model.influences(p.test, p.train)
    fresh = _model(p, damping=1.0).fit(p.train).influences(p.test, p.train)
    np.testing.assert_allclose(after, fresh, rtol=1e-12)
    assert not np.allclose(before, after)


def test_leave_one_out_retraining_agrees_with_influence():
    """Koh & Liang (2017): predicted vs actual change of test loss when a training point is removed."""
    l2 = 0.05
    p = models.logistic_problem(n_train=40, n_test=4, l2=l2)
    x, y = p.train
    n = x.shape[0]

    def weighted_objective(params, weights):
        losses = jax.vmap(lambda xi, yi: p.loss_fn(params, (xi[None], yi[None])))(x, y)
        return jnp.sum(weights * losses) / jnp.sum(weights)

    def newton(weights, params):
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        f = lambda q: weighted_objective(unravel(q), weights)  # noqa: E731

        def step(q, _):
            return q - jnp.linalg.solve(jax.hessian(f)(q), jax.grad(f)(q)), None

        return unravel(jax.lax.scan(step, flat, None, length=30)[0])

    newton = jax.jit(newton)
    theta = newton(jnp.ones(n), p.params)
    removed = jnp.arange(8)
    weights = jnp.ones((8, n)).at[jnp.arange(8), removed].set(0.0)
    thetas = jax.jit(jax.vmap(newton, in_axes=(0, None)))(weights, theta)
    test_loss = lambda q: p.loss_fn(q, p.test)  # noqa: E731
    actual = jax.vmap(test_loss)(thetas) - test_loss(theta)

    model = jaxinf.InfluenceModel(p.loss_fn, theta, jaxinf.direct(), damping=0.0).fit(p.train)
    # The influence of the whole test set is the mean of per-point influences (the test loss is a mean).
    predicted = jnp.mean(model.influences(p.test, (x[removed], y[removed])), axis=0) / n
    corr = np.corrcoef(actual, predicted)[0, 1]
    assert corr > 0.99, (actual, predicted)
    np.testing.assert_allclose(predicted, actual, rtol=0.15, atol=1e-4)


# --------------------------------------------------------------------------- errors


def test_bad_input_gets_clear_errors():
    p = models.mlp_problem("plain")
    x, y = p.train
    with pytest.raises(ValueError, match="Unknown curvature"):
        jaxinf.InfluenceModel(p.loss_fn, p.params, jaxinf.direct(), curvature="hessain")
    with pytest.raises(TypeError, match="jaxinf.Solver"):
        jaxinf.InfluenceModel(p.loss_fn, p.params, "direct")
    with pytest.raises(ValueError, match=r"params\['w1'\] contains 1 NaN"):
        jaxinf.InfluenceModel(p.loss_fn, dict(p.params, w1=p.params["w1"].at[0, 0].set(jnp.nan)), jaxinf.direct())
    with pytest.raises(ValueError, match="gauss_newton.*model_fn"):
        jaxinf.InfluenceModel(p.loss_fn, p.params, jaxinf.direct(), curvature="gauss_newton")

    model = _model(p)
    with pytest.raises(jaxinf.NotFittedError, match=r"call model.fit\(train_data\) first"):
        model.influences(p.test, p.train)
    model.fit(p.train)
    with pytest.raises(ValueError, match="Unknown mode"):
        model.influences(p.test, p.train, mode="down")
    with pytest.raises(ValueError, match="different leading sizes"):
        model.influences((p.test[0], p.test[1][:-1]), p.train)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.influences((p.test[0].at[1, 1].set(jnp.inf), p.test[1]), p.train)
    with pytest.raises(ValueError, match="tree structure"):
        model.influences({"x": p.test[0], "y": p.test[1]}, p.train)
    factors = model.influence_factors(p.test)
    with pytest.raises(ValueError, match="factors"):
        model.influences_from_factors(jax.tree.map(lambda a: a[0], factors), p.train)


def test_singular_curvature_with_zero_damping_is_refused_by_the_wrapper():
    p = models.mlp_problem("plain", n_train=3)
    with pytest.raises(ValueError, match="singular"):
        _model(p, damping=0.0).fit(p.train)
