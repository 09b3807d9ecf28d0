"""Gradient-similarity baselines (jaxinf.solvers.similarity) against brute-force per-example gradients in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf import scale
from jaxinf.solvers.similarity import gradient_cosine, gradient_dot, tracin, tracin_self_influence
from tests import models


def _loss(params, batch):
    hidden = jnp.tanh(batch[0] @ params["l1"]["w"] + params["l1"]["b"])
    return 0.5 * jnp.mean(jnp.sum((hidden @ params["l2"]["w"] + params["l2"]["b"] - batch[1]) ** 2, axis=-1))


@pytest.fixture(scope="module")
def problem():
    """A two-layer tanh MLP (plain JAX, params ``{"l1": {"w", "b"}, "l2": {...}}``, p = 20); 11 train, 3 test points."""
    rng = np.random.default_rng(0)
    params = {
        "l1": {"w": rng.normal(size=(3, 3)), "b": 0.1 * rng.normal(size=3)},
        "l2": {"w": rng.normal(size=(3, 2)), "b": np.zeros(2)},
    }
    x, y = rng.normal(size=(14, 3)), rng.normal(size=(14, 2))
    return models.Problem(_loss, jax.tree.map(jnp.asarray, params), (x[:11], y[:11]), (x[11:], y[11:]), None, None)


@pytest.fixture(scope="module")
def checkpoints(problem):
    """Two checkpoints: the params moved along a random direction, and the params themselves."""
    leaves, treedef = jax.tree.flatten(problem.params)
    rng = np.random.default_rng(1)
    moved = [np.asarray(x) + 0.3 * rng.normal(size=np.shape(x)) for x in leaves]
    return [jax.tree.unflatten(treedef, moved), problem.params]


@pytest.fixture(scope="module")
def grads(problem, checkpoints):
    """``{(checkpoint index, "train" | "test"): (n, p)}`` per-example gradients; index 1 is the model's params."""
    out = {}
    for c, params in enumerate(checkpoints):
        g = models.dense_grads(
            problem.loss_fn,
            params,
            (np.concatenate([problem.train[0], problem.test[0]]), np.concatenate([problem.train[1], problem.test[1]])),
        )
        out[c, "train"], out[c, "test"] = np.asarray(g[:11]), np.asarray(g[11:])
    return out


def _train(problem):
    """The training data in batches of 4, 4 and a ragged 3."""
    return [jax.tree.map(lambda a, i=i: a[i : i + 4], problem.train) for i in range(0, 11, 4)]


def _model(problem, solver, damping=0.0):
    # the baselines do not use the curvature kind; "fisher" shares the fit-time checks' compiles with test_datainf.
    # TracIn and the cosine score only through their scorers, so a named scoring method is refused for them.
    scoring = "auto" if getattr(solver.solve, "scorer_only", False) else "gradients"
    return jaxinf.InfluenceModel(
        problem.loss_fn, problem.params, solver, damping=damping, curvature="fisher", scoring=scoring
    )


def test_gradient_dot(problem, grads):
    model = _model(problem, gradient_dot()).fit(_train(problem))
    g_train, g_test = grads[1, "train"], grads[1, "test"]
    np.testing.assert_allclose(model.influences(problem.test, _train(problem)), g_test @ g_train.T, rtol=1e-12)
    np.testing.assert_allclose(model.influences(_train(problem), problem.test), g_train @ g_test.T, rtol=1e-12)
    np.testing.assert_allclose(model.self_influence(problem.test), np.sum(g_test**2, axis=1), rtol=1e-12)
    factors = model.influence_factors(problem.test)
    flat = np.concatenate([np.reshape(x, (3, -1)) for x in jax.tree.leaves(factors)], axis=1)
    np.testing.assert_allclose(flat, g_test, rtol=1e-12)


def test_gradient_cosine(problem, grads, tmp_path):
    model = _model(problem, gradient_cosine()).fit(_train(problem))
    g_train, g_test = grads[1, "train"], grads[1, "test"]
    unit = lambda g: g / np.linalg.norm(g, axis=1, keepdims=True)  # noqa: E731
    got = model.influences(problem.test, _train(problem))
    np.testing.assert_allclose(got, unit(g_test) @ unit(g_train).T, rtol=1e-12)
    np.testing.assert_allclose(model.influences(problem.test), unit(g_test) @ unit(g_test).T, rtol=1e-12)
    # no factor f(z') gives the cosine as f(z')ᵀ ∇θℓ(z): everything that needs one says so
    for call in (
        lambda: model.influence_factors(problem.test),
        lambda: model.self_influence(problem.test),
        lambda: model.influences(problem.test, _train(problem), mode="perturbation"),
        lambda: scale.compute_influences(model, problem.test, problem.train, tmp_path / "z", progress=False),
    ):
        with pytest.raises(ValueError, match=r"gradient_cosine\(\).*scores only through.*itself is 1"):
            call()
    with pytest.raises(ValueError, match=r"scoring='jvp' cannot take effect: gradient_cosine\(\).*its own scorer"):
        jaxinf.InfluenceModel(problem.loss_fn, problem.params, gradient_cosine(), scoring="jvp")  # was ignored


def test_gradient_cosine_of_a_zero_gradient_is_zero():
    loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)  # noqa: E731
    x, y = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), jnp.array([1.0, 2.0, 0.0])  # example 2 fits exactly
    operator = jaxinf.curvature_operator(loss, jnp.zeros(2), (x, y))
    solver = gradient_cosine()
    scores = jax.jit(solver.score)(solver.init(operator), operator, (x, y), (x, y))
    np.testing.assert_allclose(scores, [[1, 0.5**0.5, 0], [0.5**0.5, 1, 0], [0, 0, 0]], rtol=1e-15)


def test_tracin_against_brute_force(problem, checkpoints, grads):
    rates = [0.3, 0.05]
    model = _model(problem, tracin(checkpoints, rates)).fit(_train(problem))
    expected = sum(eta * grads[c, "test"] @ grads[c, "train"].T for c, eta in enumerate(rates))
    np.testing.assert_allclose(model.influences(problem.test, _train(problem)), expected, rtol=1e-12)
    squares = [np.sum(grads[c, "train"] ** 2, axis=1) for c in range(2)]
    self_expected = rates[0] * squares[0] + rates[1] * squares[1]
    got = tracin_self_influence(problem.loss_fn, checkpoints, rates, _train(problem))
    np.testing.assert_allclose(got, self_expected, rtol=1e-12)
    with pytest.raises(ValueError, match=r"tracin\(\).*scores only through.*tracin_self_influence"):
        model.self_influence(problem.test)
    # one checkpoint, the model's params, η = 1: gradient_dot
    one = _model(problem, tracin([problem.params], 1.0)).fit(_train(problem)).influences(problem.test, problem.train)
    dot = _model(problem, gradient_dot()).fit(_train(problem)).influences(problem.test, problem.train)
    np.testing.assert_allclose(one, dot, rtol=1e-12)
    np.testing.assert_allclose(one, grads[1, "test"] @ grads[1, "train"].T, rtol=1e-12)


def test_damping_is_refused(problem, checkpoints):
    """No curvature: a damping cannot take effect, so it is refused (and flagged by gradient_dot's solve)."""
    op = jaxinf.curvature_operator(problem.loss_fn, problem.params, problem.train, damping=0.1)
    for solver in (gradient_dot(), gradient_cosine(), tracin(checkpoints, 1.0)):
        with pytest.raises(ValueError, match=rf"{solver.name}\(\) has no curvature.*damping=0\.1.*damping=0"):
            solver.validate(solver.init(op))
    state = gradient_dot().init(op)
    v = jax.tree.map(jnp.ones_like, problem.params)
    assert not bool(jax.jit(gradient_dot().solve)(state, v)[1].converged)


def test_tracin_refusals(problem, checkpoints):
    with pytest.raises(ValueError, match="non-empty list"):
        tracin([], 1.0)
    with pytest.raises(ValueError, match="one per checkpoint"):
        tracin(checkpoints, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite and > 0"):
        tracin(checkpoints, [1.0, -1.0])
    other = jax.tree.map(lambda a: a[..., :1], problem.params)
    with pytest.raises(ValueError, match=r"checkpoints\[1\] has another layout"):
        tracin([problem.params, other], 1.0)
    op = jaxinf.curvature_operator(problem.loss_fn, problem.params, problem.train)
    with pytest.raises(ValueError, match="another layout .* than the model's params"):
        tracin([other], 1.0).init(op)
    solver = tracin(checkpoints, [0.5, 0.25])  # recorded: the rates and a digest of the checkpoints
    assert solver.config["learning_rates"] == [0.5, 0.25] and len(solver.config["checkpoints"]["array"]) == 64
    assert hash(solver) == hash(solver) and gradient_dot().config == {"factory": "gradient_dot"}


def test_stream_fit(problem, checkpoints, grads):
    """scale.fit_from_stream(model, ...) fits the baselines too (their state is the layout and the checkpoints)."""
    model = scale.fit_from_stream(_model(problem, tracin(checkpoints, 0.5)), scale.ArraySource(problem.train, 4))
    expected = sum(0.5 * grads[c, "test"] @ grads[c, "train"].T for c in range(2))
    np.testing.assert_allclose(model.influences(problem.test, problem.train), expected, rtol=1e-12)
