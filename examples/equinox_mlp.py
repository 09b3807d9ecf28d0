"""Equinox: an ``eqx.nn.MLP`` (vmapped over examples), its arrays as the params pytree."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _data import digits

import jaxinf

(x, y), (x_test, y_test) = digits()
mlp = eqx.nn.MLP(64, 10, width_size=32, depth=1, activation=jnp.tanh, key=jax.random.key(0))
params, static = eqx.partition(mlp, eqx.is_inexact_array)


def model_fn(params, batch):
    return jax.vmap(eqx.combine(params, static))(batch[0])


def output_loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()


def loss_fn(params, batch):
    return output_loss(model_fn(params, batch), batch)


optimizer = optax.adam(1e-2)
opt_state = optimizer.init(params)


@jax.jit  # one compiled training step
def train_step(params, opt_state, batch):
    updates, opt_state = optimizer.update(jax.grad(loss_fn)(params, batch), opt_state)
    return optax.apply_updates(params, updates), opt_state


for _ in range(300):
    params, opt_state = train_step(params, opt_state, (x, y))

inf = jaxinf.InfluenceModel(loss_fn, params, jaxinf.cg(block=True, rtol=1e-4), damping=1e-3,
                            curvature="gauss_newton", model_fn=model_fn, output_loss=output_loss)
inf.fit((x, y))
scores = inf.influences((x_test, y_test), (x, y))
print("influences", scores.shape, "most helpful training point for test #0:", int(jnp.argmax(scores[0])))
