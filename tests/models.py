"""Small models and data shared by the tests: Flax Linen, Flax NNX and plain JAX.

Each builder returns a :class:`Problem` with a mean ``loss_fn(params, batch)``,
the split ``model_fn`` / ``output_loss`` pair for Gauss-Newton, and train/test
batches ``(x, y)``. Everything is float64 unless a dtype is given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxinf.core.checks import CHECK_COMPILER_OPTIONS


class Problem(NamedTuple):
    loss_fn: Callable
    params: Any
    train: Any
    test: Any
    model_fn: Callable
    output_loss: Callable


def squared_error(outputs, batch):
    return 0.5 * jnp.mean(jnp.sum((outputs - batch[1]) ** 2, axis=-1))


def softmax_cross_entropy(logits, batch):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))


# The builders draw their data and params inside one jitted program per shape (the seed is traced), compiled
# unoptimised like the library's one-off check programs: drawn eagerly, every jax.random call, slice and cast
# compiled a program of its own (about 2.2 s for one regression problem in a fresh process, against 0.7-0.9 s for
# the one program at -O0 and 1.6-1.9 s at XLA's default), and after `_free_compiled_programs` each test module
# compiled (or read back) them again.


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5), compiler_options=CHECK_COMPILER_OPTIONS)
def _regression_data(seed, n_train, n_test, d_in, d_out, dtype):
    kx, kw, kn, kt = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (n_train + n_test, d_in), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (d_in, d_out), jnp.float32).astype(dtype)
    y = jnp.tanh(x @ w) + 0.1 * jax.random.normal(kn, (n_train + n_test, d_out), jnp.float32).astype(dtype)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


class LinenMLP(nn.Module):
    hidden: int = 6
    out: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(self.out)(x)


class NNXMLP(nnx.Module):
    def __init__(self, d_in, hidden, out, *, rngs, dtype=jnp.float64):
        self.l1 = nnx.Linear(d_in, hidden, rngs=rngs, param_dtype=jnp.float32)
        self.l2 = nnx.Linear(hidden, out, rngs=rngs, param_dtype=jnp.float32)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


@functools.partial(jax.jit, static_argnums=(0, 3), compiler_options=CHECK_COMPILER_OPTIONS)
def _linen_init(module: nn.Module, seed, x, dtype):
    """``module.init`` on the first example of ``x``, every leaf cast to ``dtype``."""
    return jax.tree.map(lambda a: a.astype(dtype), module.init(jax.random.key(seed), x[:1]))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4), compiler_options=CHECK_COMPILER_OPTIONS)
def _plain_params(seed, d_in, hidden, out, dtype):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "w1": jax.random.normal(k1, (d_in, hidden), jnp.float32).astype(dtype) / jnp.sqrt(d_in),
        "b1": jnp.zeros((hidden,), dtype),
        "w2": jax.random.normal(k2, (hidden, out), jnp.float32).astype(dtype) / jnp.sqrt(hidden),
        "b2": jnp.zeros((out,), dtype),
    }


def mlp_problem(flavour: str = "linen", *, n_train=23, n_test=5, d_in=4, hidden=6, out=2, dtype=jnp.float64, seed=0):
    """A tanh MLP on a random regression task, in ``flavour`` linen | nnx | plain."""
    train, test = _regression_data(seed, n_train, n_test, d_in, out, dtype)
    if flavour == "linen":
        module = LinenMLP(hidden, out)
        params = _linen_init(module, seed + 1, train[0], dtype)

        def model_fn(p, batch):
            return module.apply(p, batch[0])

    elif flavour == "nnx":
        model = NNXMLP(d_in, hidden, out, rngs=nnx.Rngs(seed + 1), dtype=dtype)
        graphdef, params = nnx.split(model, nnx.Param)
        params = jax.tree.map(lambda a: a.astype(dtype), params)  # same values in every dtype

        def model_fn(p, batch):
            return nnx.merge(graphdef, p)(batch[0])

    elif flavour == "plain":
        params = _plain_params(seed + 1, d_in, hidden, out, dtype)

        def model_fn(p, batch):
            return jnp.tanh(batch[0] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    else:
        raise ValueError(flavour)

    def loss_fn(p, batch):
        return squared_error(model_fn(p, batch), batch)

    return Problem(loss_fn, params, train, test, model_fn, squared_error)


def logistic_problem(*, n_train=30, n_test=6, d=3, classes=3, l2=0.0, dtype=jnp.float64, seed=0):
    """Multinomial logistic regression ``softmax(x W + b)`` with optional L2; params ``{"w", "b"}``."""
    train, test, params = _logistic_data(seed, n_train, n_test, d, classes, dtype)

    def model_fn(p, batch):
        return batch[0] @ p["w"] + p["b"]

    def loss_fn(p, batch):
        reg = 0.5 * l2 * (jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2))
        return softmax_cross_entropy(model_fn(p, batch), batch) + reg

    return Problem(loss_fn, params, train, test, model_fn, softmax_cross_entropy)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5), compiler_options=CHECK_COMPILER_OPTIONS)
def _logistic_data(seed, n_train, n_test, d, classes, dtype):
    kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n_train + n_test, d), jnp.float32).astype(dtype)
    w_true = jax.random.normal(kw, (d, classes), jnp.float32).astype(dtype)
    y = jax.random.categorical(ky, x @ w_true)
    params = {"w": 0.3 * w_true, "b": jnp.zeros((classes,), dtype)}
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), params


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6), compiler_options=CHECK_COMPILER_OPTIONS)
def _image_data(seed, n_train, n_test, size, channels, classes, dtype):
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n_train + n_test, size, size, channels), jnp.float32).astype(dtype)
    y = jax.random.randint(ky, (n_train + n_test,), 0, classes)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


class LinenCNN(nn.Module):
    classes: int = 3
    features: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(self.features, (3, 3), padding="SAME")(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.classes)(x)


def cnn_problem(*, n_train=10, n_test=3, size=4, channels=1, classes=3, dtype=jnp.float64, seed=0):
    """A one-conv-layer Linen CNN classifier on random images (NHWC)."""
    train, test = _image_data(seed, n_train, n_test, size, channels, classes, dtype)
    module = LinenCNN(classes)
    params = _linen_init(module, seed + 1, train[0], dtype)

    def model_fn(p, batch):
        return module.apply(p, batch[0])

    def loss_fn(p, batch):
        return softmax_cross_entropy(model_fn(p, batch), batch)

    return Problem(loss_fn, params, train, test, model_fn, softmax_cross_entropy)


def tanh_model_fn(p, batch):
    """A one-hidden-layer tanh network, ``tanh(x W1) w2``: the toy model of the compile and damping tests."""
    return jnp.tanh(batch[0] @ p["w1"]) @ p["w2"]


def mse_output_loss(out, batch):
    return jnp.mean((out - batch[1]) ** 2)


def tanh_loss_fn(p, batch):
    return mse_output_loss(tanh_model_fn(p, batch), batch)


def random_factors(params, k: int, seed: int = 0):
    """``k`` random params-shaped factors (leading axis ``k``, each leaf in its own dtype), drawn with NumPy.

    For identities that hold for any factors: a ``jax.random`` draw compiles a program per leaf shape (about
    0.5 s each on CPU in float64), which made one test module spend 24 s compiling random numbers.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal((k, *np.shape(x))), jnp.result_type(x)), params)


def dense_hessian(loss_fn, params, batch):
    """Reference: ``jax.hessian`` of the loss on the raveled parameters (one batch = full data)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return jax.jit(jax.hessian(lambda f, b: loss_fn(unravel(f), b)))(flat, batch)


def dense_grads(loss_fn, params, batch):
    """Reference per-example gradients ``(n, p)`` by a Python-free vmap over batches of one."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def one(f, example):
        b = jax.tree.map(lambda a: a[None], example)
        return jax.grad(lambda q: loss_fn(unravel(q), b))(f)

    return jax.jit(jax.vmap(one, in_axes=(None, 0)))(flat, batch)
