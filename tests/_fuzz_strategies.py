"""Hypothesis strategies for the property-based suite (tests/test_fuzz_entry_points.py).

A :class:`Case` is a random least-squares problem built on a random parameter
pytree: the leaves (nested dicts, lists and tuples, odd shapes, zero-size
leaves, float32 or float64) are raveled into ``θ`` of size ``P`` and each
example ``(x_i, y_i)`` contributes ``(x_iᵀθ − y_i)²`` to the **mean** loss.
The curvature has a closed form (Hessian = Gauss-Newton = ``2XᵀX/N``,
empirical Fisher ``(1/N) Σ g_i g_iᵀ``), so every result is checked against the
exact answer, which is what ``direct`` computes. Rows of ``X`` have norm at
most one and the damping is at least 0.5, so ``C + λI`` is well conditioned
(condition number below about 60) and every iterative solver converges.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

BATCH_LAYOUTS = ("tuple", "dict", "nested")
KINDS = ("hessian", "gauss_newton", "fisher")


@dataclasses.dataclass
class Case:
    """One random problem: params, training batches, test batch, damping, curvature kind."""

    params: Any
    dtype: Any
    layout: str  # how a batch holds (x, y): see BATCH_LAYOUTS
    train_sizes: tuple  # sizes of the training batches; one entry: a single batch, not a list
    n_test: int
    damping: float
    kind: str
    seed: int
    x: np.ndarray = dataclasses.field(repr=False, default=None)
    y: np.ndarray = dataclasses.field(repr=False, default=None)
    x_test: np.ndarray = dataclasses.field(repr=False, default=None)
    y_test: np.ndarray = dataclasses.field(repr=False, default=None)

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        n = sum(self.train_sizes)
        x = rng.normal(size=(n + self.n_test, self.size))
        x /= np.maximum(1.0, np.linalg.norm(x, axis=1, keepdims=True))
        y = rng.uniform(-1.0, 1.0, size=n + self.n_test)
        self.x, self.x_test = x[:n], x[n:]
        self.y, self.y_test = y[:n], y[n:]

    # ------------------------------------------------------------- shapes
    @property
    def size(self) -> int:
        return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(self.params))

    @property
    def theta(self) -> np.ndarray:
        leaves = jax.tree.leaves(self.params)
        return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in leaves])

    # ---------------------------------------------------------------- data
    def batch(self, x, y):
        x, y = jnp.asarray(x, self.dtype), jnp.asarray(y, self.dtype)
        if self.layout == "tuple":
            return (x, y)
        if self.layout == "dict":
            return {"x": x, "y": y}
        return {"inputs": (x,), "target": {"y": y}}

    def train(self):
        """One batch, or a list of batches (ragged, size-1 batches allowed)."""
        if len(self.train_sizes) == 1:
            return self.batch(self.x, self.y)
        bounds = np.cumsum((0, *self.train_sizes))
        return [self.batch(self.x[a:b], self.y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def test(self):
        return self.batch(self.x_test, self.y_test)

    # ---------------------------------------------------------- the loss
    def unpack(self, batch):
        if self.layout == "tuple":
            return batch
        if self.layout == "dict":
            return batch["x"], batch["y"]
        return batch["inputs"][0], batch["target"]["y"]

    def model_fn(self, params, batch):
        x, _ = self.unpack(batch)
        theta = jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(params)])
        return (x @ theta)[:, None]

    def output_loss(self, outputs, batch):
        _, y = self.unpack(batch)
        return jnp.mean((outputs[:, 0] - y) ** 2)

    def loss_fn(self, params, batch):
        return self.output_loss(self.model_fn(params, batch), batch)

    # --------------------------------------------------- exact references
    def gradients(self, x, y) -> np.ndarray:
        residual = x @ self.theta - y
        return 2.0 * residual[:, None] * x

    def curvature(self, *, by_leaf: bool = False) -> np.ndarray:
        """The undamped curvature ``C`` (``P × P``); ``by_leaf``: only its diagonal blocks, one per leaf."""
        if self.kind == "fisher":
            g = self.gradients(self.x, self.y)
            c = g.T @ g / len(g)
        else:
            c = 2.0 * self.x.T @ self.x / len(self.x)
        if by_leaf:
            mask = np.zeros_like(c, bool)
            start = 0
            for leaf in jax.tree.leaves(self.params):
                k = int(np.size(leaf))
                mask[start : start + k, start : start + k] = True
                start += k
            c = np.where(mask, c, 0.0)
        return c

    def damped(self, *, by_leaf: bool = False) -> np.ndarray:
        return self.curvature(by_leaf=by_leaf) + self.damping * np.eye(self.size)

    def influences(self, *, by_leaf: bool = False) -> np.ndarray:
        """``I[i, j] = g_testᵢᵀ (C + λI)⁻¹ g_trainⱼ`` in float64."""
        g_test = self.gradients(self.x_test, self.y_test)
        g_train = self.gradients(self.x, self.y)
        return g_test @ np.linalg.solve(self.damped(by_leaf=by_leaf), g_train.T)


# ------------------------------------------------------------------ strategies


def _nest(draw, leaves: list, depth: int):
    """A random container tree (dict / list / tuple) over ``leaves``, in flatten order."""
    if len(leaves) == 1 and (depth >= 2 or draw(st.booleans())):
        return leaves[0]
    kind = draw(st.sampled_from(["dict", "list", "tuple"]))
    if depth >= 2 or len(leaves) == 1:
        groups = [[leaf] for leaf in leaves]
    else:
        cuts = sorted(draw(st.sets(st.integers(1, len(leaves) - 1), max_size=len(leaves) - 1)))
        bounds = [0, *cuts, len(leaves)]
        groups = [leaves[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    children = [_nest(draw, group, depth + 1) for group in groups]
    if kind == "dict":  # keys in sorted order, so the flatten order is the order drawn
        return {f"k{i}": child for i, child in enumerate(children)}
    return children if kind == "list" else tuple(children)


@st.composite
def params_trees(draw, dtype, *, max_size: int = 8):
    """A random pytree of float leaves of total size 1..max_size (zero-size leaves allowed)."""
    shapes = draw(
        st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=2).map(tuple), min_size=1, max_size=4).filter(
            lambda ss: 1 <= sum(int(np.prod(s)) for s in ss) <= max_size
        )
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    leaves = [jnp.asarray(rng.uniform(-0.5, 0.5, size=s), dtype) for s in shapes]
    return _nest(draw, leaves, 0)


@st.composite
def cases(draw, *, kinds=KINDS, dtypes=(np.float64, np.float32)):
    """A random :class:`Case`."""
    dtype = draw(st.sampled_from(dtypes))
    params = draw(params_trees(dtype))
    n_batches = draw(st.integers(1, 3))
    sizes = tuple(draw(st.lists(st.integers(1, 4), min_size=n_batches, max_size=n_batches)))
    return Case(
        params=params,
        dtype=dtype,
        layout=draw(st.sampled_from(BATCH_LAYOUTS)),
        train_sizes=sizes,
        n_test=draw(st.integers(1, 3)),
        damping=draw(st.floats(0.5, 1.0)),
        kind=draw(st.sampled_from(kinds)),
        seed=draw(st.integers(0, 2**16)),
    )
