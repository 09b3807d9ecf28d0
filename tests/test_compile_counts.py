"""How many XLA programs a first fit + ``influences`` compiles, per solver (issue 15, "first calls").

A first call's time is mostly compilation, and every program costs its own
tracing, lowering and compile. Eager operations on concrete arrays in the
library's host code (each compiles a program of its own: ``a[i]`` two,
``jnp.all(jnp.isfinite(x))`` two per leaf) and one check compiled once per
form of the loss used to bring a cold CG fit + scoring of the benchmark MLP to
42 programs; they now run inside one jitted program each (or in NumPy on
host data: the layer analysis's index probes). Counted here from
JAX's compile events, with every cache cleared and functions of the test's
own (so no plan or profile kept by an earlier test is reused): upper bounds
that fail if an eager operation or a duplicate program comes back.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import pytest
from jax import monitoring

import jaxinf
from jaxinf.solvers import planned
from tests import models

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_SEEN = {"on": False, "names": []}


def _listen(event: str, duration: float, **kwargs) -> None:
    if _SEEN["on"] and event == BACKEND_COMPILE:
        _SEEN["names"].append(kwargs.get("fun_name", "?"))


monitoring.register_event_duration_secs_listener(_listen)

#: Programs per cold fit + influences below, measured on the CPU: direct 7, cg 6, ekfac 5 (9, 8, 7 while the list of
#: device-array batches was stacked and the chunks of factors joined by programs of their own, ``_stack_jit`` and
#: ``_join``, which an accelerator still compiles; 11, 10, 8 while the scoring loops stacked the batch list given and
#: indexed it back out and the factors' finiteness was a program of its own; 15, 14, 12 before the layer probes ran
#: on NumPy and the fit-time checks became one program; 31, 24 and 19 before that, without the bias).
BOUNDS = {"direct": 7, "cg": 6, "ekfac": 5} if jax.default_backend() == "cpu" else {"direct": 9, "cg": 8, "ekfac": 7}
#: Eager operations of host code that must not compile programs of their own (2 per leaf or per block before).
EAGER = {"dynamic_slice", "squeeze", "isfinite", "_reduce_all", "_reduce_min", "_reduce_max", "stack", "abs", "add",
         "_where", "broadcast_in_dim", "reshape", "transpose", "convert_element_type"}  # fmt: skip
#: Programs that must be compiled once per fit (they were compiled once per form of the loss or per batch shape).
ONCE = ("_all_losses", "_fit_checks")
#: Programs fused into ``_fit_checks`` (the losses' values and the curvature probes of the fit-time checks) and into
#: ``solve_all`` (the factors' finiteness, ``tree_all_finite``).
FUSED = {"_values_eager", "_probe_norms", "_probe_norms_eager", "tree_all_finite"}
FACTORIES = {"direct": jaxinf.direct, "cg": lambda: jaxinf.cg(rtol=1e-6), "ekfac": jaxinf.ekfac}


@pytest.fixture(scope="module")
def data():
    kx, kw, kv = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (44, 3))
    y = jnp.cos(x @ jnp.ones(3))
    params = {"w1": 0.5 * jax.random.normal(kw, (3, 4)), "b1": 0.1 * jnp.ones(4), "w2": jax.random.normal(kv, (4,))}
    train = [(x[i : min(i + 8, 40)], y[i : min(i + 8, 40)]) for i in range(0, 40, 8)]
    train[-1] = (train[-1][0][:5], train[-1][1][:5])  # a ragged last batch: 37 examples
    return params, train, (x[40:], y[40:])


def _cold_names(solver: str, params, train, test) -> list[str]:
    """The names of the programs a first fit + ``influences`` compiles, with functions no cache has seen."""

    def model_fn(p, batch):  # new function objects: no layer plan or profile of them is kept
        hidden = batch[0] @ p["w1"] + jnp.reshape(p["b1"], (1, -1))  # a bias reshaped as Flax does: a layout chain
        return jnp.tanh(hidden) @ p["w2"]

    def output_loss(out, batch):
        return models.mse_output_loss(out, batch)

    def loss_fn(p, batch):
        return output_loss(model_fn(p, batch), batch)

    kw = dict(damping=0.1, curvature="gauss_newton", model_fn=model_fn, output_loss=output_loss)
    jax.clear_caches()
    planned._ROWS.clear()
    _SEEN["on"], _SEEN["names"] = True, []
    try:
        model = jaxinf.InfluenceModel(loss_fn, params, FACTORIES[solver](), **kw).fit(train)
        jax.block_until_ready(model.influences(test, train))
    finally:
        _SEEN["on"] = False
    return [n.removeprefix("jit(").removesuffix(")") for n in _SEEN["names"]]


@pytest.mark.parametrize("solver", sorted(BOUNDS))
def test_a_first_call_compiles_few_programs(data, solver):
    names = _cold_names(solver, *data)
    counts = collections.Counter(names)
    assert len(names) <= BOUNDS[solver], counts
    assert not EAGER & set(counts), counts
    assert all(counts[name] == 1 for name in ONCE), counts
    assert not FUSED & set(counts), counts
    assert counts["stage"] <= 1, counts  # damping's; the layer analysis's bias probe was a second
    assert counts["_batch_at"] == 0, counts  # the batches given are visited as given: nothing stacked, unstacked
    if jax.default_backend() == "cpu":  # stacked and joined on the host there: a memory copy, nothing compiled
        assert counts["_stack_jit"] == 0 and counts["_join"] == 0, counts
