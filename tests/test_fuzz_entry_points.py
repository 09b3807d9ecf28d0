"""Property-based tests of the public entry points (issue 16): exact answers, or a named jaxinf error.

Random parameter pytrees (nested dicts, lists and tuples; odd shapes and
zero-size leaves; float32 or float64), random batch trees and sizes (one batch
or a ragged list with size-1 batches) and every solver, through
:class:`jaxinf.InfluenceModel` and :func:`jaxinf.curvature_operator`. The
problems (:mod:`tests._fuzz_strategies`) are least squares on the raveled
parameters, whose curvature is known in closed form and well conditioned once
damped, so the properties are:

* a valid input gives the exact answer (what ``direct`` computes) within the
  solver's tolerance: the iterative solvers are configured to converge, and a
  ``ConvergenceError`` here would be a finding, not an excuse;
* a bad input raises ``ValueError``/``TypeError``/``ConvergenceError``/
  ``NotFittedError`` from inside jaxinf, with a message naming the offending
  argument. No other exception type may escape.

The default profile ("fuzz") is derandomized and short; ``HYPOTHESIS_PROFILE=slow``
runs many more random examples.
"""

from __future__ import annotations

import os
import pathlib
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import jaxinf
import jaxinf.scoring
from jaxinf.core.tree import ravel
from tests._fuzz_strategies import Case, cases

_HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
# "fuzz" (default): derandomized, no shrinking, a few examples (every compile counts on a 2-core machine).
# "slow" (HYPOTHESIS_PROFILE=slow): random, shrinking, 20x the examples; no example database in either.
settings.register_profile("fuzz", max_examples=2, deadline=None, derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=_HEALTH)  # fmt: skip
settings.register_profile("slow", max_examples=40, deadline=None, database=None, suppress_health_check=_HEALTH)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fuzz"))


def examples(factor: float) -> int:
    """``factor`` times the profile's ``max_examples`` (at least one)."""
    return max(1, int(settings().max_examples * factor))


SOLVERS = ("direct", "cg", "cg_block", "lissa", "arnoldi", "nystrom", "kfac", "ekfac")
KFAC = ("kfac", "ekfac")
JAXINF_DIR = pathlib.Path(jaxinf.__file__).parent
ALLOWED = (ValueError, TypeError, jaxinf.ConvergenceError, jaxinf.NotFittedError)


def make_solver(name: str, case: Case):
    """``name`` configured to reach the exact answer on ``case`` (full rank, tight tolerances)."""
    single = case.dtype == np.float32
    rtol = 1e-5 if single else 1e-11
    p = case.size
    if name == "direct":
        return jaxinf.direct()
    if name in ("cg", "cg_block"):
        return jaxinf.cg(rtol=rtol, maxiter=10 * p + 20, block=name == "cg_block")
    if name == "lissa":  # scale = the largest eigenvalue: contraction rate 1 − λ_min/λ_max (cond < 60)
        scale = float(np.linalg.eigvalsh(case.damped())[-1])
        return jaxinf.lissa(scale=scale, maxiter=4000, rtol=rtol, batch_size=None)
    if name == "arnoldi":
        return jaxinf.arnoldi(p, krylov_dim=p)
    if name == "nystrom":
        return jaxinf.nystrom(p)
    # Exact Fisher: every leaf is a fallback block of the Gauss-Newton, so (E)K-FAC is exact per leaf.
    return jaxinf.kfac(fisher="exact") if name == "kfac" else jaxinf.ekfac(fisher="exact")


def tolerance(name: str, case: Case) -> float:
    if case.dtype == np.float32:
        return 5e-3
    return {"direct": 1e-9, "kfac": 1e-9, "ekfac": 1e-9, "lissa": 1e-6}.get(name, 1e-7)


def model_for(case: Case, solver, **overrides):
    kwargs = dict(
        loss_fn=case.loss_fn,
        params=case.params,
        solver=solver,
        damping=case.damping,
        curvature=case.kind,
        model_fn=case.model_fn,
        output_loss=case.output_loss,
    )
    kwargs.update(overrides)
    loss_fn, params, solver = kwargs.pop("loss_fn"), kwargs.pop("params"), kwargs.pop("solver")
    return jaxinf.InfluenceModel(loss_fn, params, solver, **kwargs)


def assert_close(got, want, tol: float, what: str) -> None:
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert err <= tol * max(1.0, float(np.max(np.abs(want)))), f"{what}: max error {err:.3g} (tol {tol:g})"


def solver_cases(name: str):
    kinds = ("gauss_newton",) if name in KFAC else ("hessian", "gauss_newton", "fisher")
    return cases(kinds=kinds)


# --------------------------------------------------------------- valid inputs: the exact answer


@pytest.mark.parametrize("name", SOLVERS)
@given(data=st.data())
@settings(max_examples=examples(0.5))
def test_entry_points_give_the_exact_answer(name, data):
    """``InfluenceModel.influences`` and ``curvature_operator`` + ``solver.init``/``solve`` on one random case."""
    case = data.draw(solver_cases(name), label="case")
    solver = make_solver(name, case)
    model = model_for(case, solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. notes on the tagging; not under test here
        model.fit(case.train(), key=jax.random.key(case.seed))
        got = model.influences(case.test(), case.train())
    tol = tolerance(name, case)
    assert_close(got, case.influences(by_leaf=name in KFAC), tol, f"{name} influences")

    op = jaxinf.curvature_operator(
        case.loss_fn,
        case.params,
        case.train(),
        kind=case.kind,
        damping=case.damping,
        model_fn=case.model_fn,
        output_loss=case.output_loss,
    )
    state = solver.init(op, key=jax.random.key(case.seed))
    v = jax.tree.map(lambda a: jnp.ones_like(a) / (1 + jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), case.params)
    x, info = solver.solve(state, v)
    assert bool(info.converged) and not bool(info.diverged), f"{name}: {info}"
    want = np.linalg.solve(case.damped(by_leaf=name in KFAC), np.asarray(ravel(v), np.float64))
    assert_close(ravel(x), want, tol, f"{name} solve")


# -------------------------------------------------------------- bad inputs: a named jaxinf error


def _first_sized_leaf(params):
    leaves, treedef = jax.tree.flatten(params)
    index = next(i for i, leaf in enumerate(leaves) if np.size(leaf))
    return leaves, treedef, index


def _recast(params, dtype):
    leaves, treedef, i = _first_sized_leaf(params)
    leaves[i] = leaves[i].astype(dtype)
    return jax.tree.unflatten(treedef, leaves)


def _other(dtype):
    return np.float32 if dtype == np.float64 else np.float64


def _with_nan(batch):
    leaves, treedef = jax.tree.flatten(batch)
    leaves[0] = leaves[0].at[0].set(jnp.nan)
    return jax.tree.unflatten(treedef, leaves)


def _wider(case: Case, batch):
    leaves, treedef = jax.tree.flatten(batch)
    leaves[0] = jnp.concatenate([leaves[0], leaves[0][:, :1]], axis=1)
    return jax.tree.unflatten(treedef, leaves)


def _train_list(case: Case):
    train = case.train()
    return train if isinstance(train, list) else [train]


# fault -> (what to change, the pattern the message must match)
FAULTS = {
    "mixed_dtypes": (lambda c: {"params": {"p": c.params, "q": jnp.zeros(2, _other(c.dtype))}}, r"params.*mix dtypes"),
    "float16_leaf": (lambda c: {"params": _recast(c.params, np.float16)}, r"params.*float16"),
    "int_leaf": (lambda c: {"params": _recast(c.params, np.int32)}, r"params.*int32"),
    "string_leaf": (lambda c: {"params": {"p": c.params, "name": "dense"}}, r"params\['name'\]"),
    "empty_batch": (lambda c: {"train": [*_train_list(c), c.batch(c.x[:0], c.y[:0])]}, r"data.*0 examples"),
    "nan_train": (lambda c: {"train": [_with_nan(b) for b in _train_list(c)]}, r"data.*NaN"),
    "nan_test": (lambda c: {"test": _with_nan(c.test())}, r"test_data.*NaN"),
    "nan_loss": (lambda c: {"loss_fn": lambda p, b: c.loss_fn(p, b) + jnp.log(-1.0 - jnp.sum(ravel(p)) ** 2)},
                 r"loss_fn.*(nan|NaN)"),
    "vector_loss": (lambda c: {"loss_fn": lambda p, b: (c.model_fn(p, b)[:, 0] - c.unpack(b)[1]) ** 2},
                    r"loss_fn.*scalar"),
    "string_damping": (lambda c: {"damping": "0.1"}, r"damping"),
    "negative_damping": (lambda c: {"damping": -1.0}, r"damping"),
    "nan_damping": (lambda c: {"damping": float("nan")}, r"damping"),
    "wider_test": (lambda c: {"test": _wider(c, c.test())}, r"test_data"),
    "not_fitted": (lambda c: {"fit": False}, r"fit"),
}  # fmt: skip


def _raised_inside_jaxinf(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and pathlib.Path(frames[-1].filename).resolve().is_relative_to(JAXINF_DIR.resolve())


def _run_model(case: Case, name: str, change: dict):
    loss = change.get("loss_fn", case.loss_fn)
    kind = "hessian" if "loss_fn" in change else case.kind  # a broken loss_fn must be the one in use
    model = model_for(
        case, make_solver(name, case), loss_fn=loss, params=change.get("params", case.params),
        damping=change.get("damping", case.damping), curvature=kind,
    )  # fmt: skip
    if change.get("fit", True):
        model.fit(change.get("train", case.train()), key=jax.random.key(0))
    return model.influences(change.get("test", case.test()), case.train())


def _run_operator(case: Case, name: str, change: dict):
    loss = change.get("loss_fn", case.loss_fn)
    kind = "hessian" if "loss_fn" in change else case.kind
    op = jaxinf.curvature_operator(
        loss, change.get("params", case.params), change.get("train", case.train()), kind=kind,
        damping=change.get("damping", case.damping), model_fn=case.model_fn, output_loss=case.output_loss,
    )  # fmt: skip
    return make_solver(name, case).init(op, key=jax.random.key(0))


OPERATOR_FAULTS = tuple(f for f in FAULTS if f not in ("nan_test", "wider_test", "not_fitted"))


@given(
    data=st.data(),
    fault=st.sampled_from(sorted(FAULTS)),
    name=st.sampled_from(SOLVERS),
    entry=st.sampled_from(["model", "operator"]),
)
@settings(max_examples=examples(8))
def test_bad_input_raises_a_jaxinf_error_naming_the_argument(data, fault, name, entry):
    if entry == "operator" and fault not in OPERATOR_FAULTS:
        entry = "model"
    case = data.draw(solver_cases(name), label="case")
    make_change, pattern = FAULTS[fault]
    change = make_change(case)
    with pytest.raises(Exception) as caught:  # noqa: B017, PT011 - the property is about which exception escapes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            (_run_model if entry == "model" else _run_operator)(case, name, change)
    error = caught.value
    assert isinstance(error, ALLOWED), f"{fault} via {entry}/{name}: {type(error).__name__}: {error}"
    assert _raised_inside_jaxinf(error), f"{fault} via {entry}/{name}: raised outside jaxinf: {error!r}"
    assert caught.match(pattern), f"{fault} via {entry}/{name}: message does not name the argument: {error}"


# ------------------------------------------------------------ regressions found by the suite


def test_params_with_only_zero_size_leaves_are_refused():
    case = Case({"a": jnp.ones((1,))}, np.float64, "tuple", (3,), 1, 0.5, "hessian", 0)
    params = {"a": jnp.zeros((0, 2)), "b": [jnp.zeros((3, 0))]}
    with pytest.raises(ValueError, match=r"params has only zero-size leaves"):
        jaxinf.curvature_operator(case.loss_fn, params, case.train(), damping=0.5)


def test_generator_of_training_batches_is_read_once_by_influences():
    case = Case({"a": jnp.full((3,), 0.1)}, np.float64, "tuple", (2, 2), 2, 0.5, "hessian", 1)
    model = model_for(case, jaxinf.direct()).fit(case.train())
    got = model.influences(case.test(), (b for b in case.train()))
    assert_close(got, case.influences(), 1e-9, "influences with a generator")


def test_generator_of_test_batches_with_a_measurement_is_read_once():
    """``influence_factors`` and ``influences_by_layer`` read the test side for the measurement's checks and then
    for the factors: a generator there used to be used up by the first read and refused by the second."""
    case = Case({"a": jnp.full((3,), 0.1)}, np.float64, "tuple", (2, 2), 2, 0.5, "hessian", 1)
    model = model_for(case, jaxinf.direct()).fit(case.train())

    def measurement(params, batch):
        return jnp.mean(batch[0] @ params["a"])

    def batches():
        return [case.batch(case.x[:2], case.y[:2]), case.batch(case.x[2:4], case.y[2:4])]

    want = model.influence_factors(batches(), measurement=measurement)
    got = model.influence_factors((b for b in batches()), measurement=measurement)
    assert_close(got["a"], want["a"], 1e-12, "influence_factors with a generator")
    want = jaxinf.influences_by_layer(model, batches(), case.train(), measurement=measurement)
    got = jaxinf.influences_by_layer(model, (b for b in batches()), case.train(), measurement=measurement)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_non_finite_loss_at_a_test_point_is_named():
    case = Case({"a": jnp.full((3,), 0.1)}, np.float64, "tuple", (4,), 2, 0.5, "hessian", 2)

    def log_loss(params, batch):  # NaN where the label is negative
        return jnp.mean((batch[0] @ params["a"] - jnp.log(batch[1])) ** 2)

    x, y = case.x, np.abs(case.y) + 0.1
    model = jaxinf.InfluenceModel(log_loss, case.params, jaxinf.direct(), damping=0.5).fit(case.batch(x, y))
    with pytest.raises(ValueError, match=r"test_data.*example 1"):
        model.influences(case.batch(case.x_test, np.array([1.0, -1.0])), case.batch(x, y))


def _badly_tagged_loss(params, batch):
    w2 = 2.0 * params["w"]  # tag_dense needs the parameter leaf itself: the layer analysis raises ValueError
    return jnp.mean((jaxinf.tag_dense(batch[0] @ w2, batch[0], w2)[:, 0] - batch[1]) ** 2)


def test_auto_scoring_warns_once_when_the_layers_cannot_be_read(monkeypatch):
    monkeypatch.setattr(jaxinf.scoring, "_DROPPED", set())
    params = {"w": jnp.full((3, 1), 0.1)}
    batch = (jnp.eye(3)[:, :3] + 0.5, jnp.ones(3))
    with pytest.warns(UserWarning, match=r"Layer-wise scoring is left out.*tag_dense was given a weight") as record:
        assert jaxinf.scoring.layer_profile(_badly_tagged_loss, params, batch) is None
        assert jaxinf.scoring.layer_profile(_badly_tagged_loss, params, batch) is None
    assert sum("Layer-wise scoring" in str(w.message) for w in record) == 1


def test_layer_profile_lets_other_errors_through():
    def broken(params, batch):
        raise RuntimeError("a bug in the loss")

    with pytest.raises(RuntimeError, match="a bug in the loss"):  # was swallowed by `except Exception`
        jaxinf.scoring.layer_profile(broken, {"w": jnp.ones(2)}, (jnp.ones((2, 2)),))
