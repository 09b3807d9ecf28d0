"""Haiku: ``hk.transform`` of an ``hk.nets.MLP``; the params dict it returns is the pytree jaxinf differentiates."""

import haiku as hk
import jax
import jax.numpy as jnp
import optax
from _data import digits

import jaxinf

(x, y), (x_test, y_test) = digits()
net = hk.without_apply_rng(hk.transform(lambda images: hk.nets.MLP([32, 10], activation=jnp.tanh)(images)))
params = net.init(jax.random.key(0), x[:2])


def model_fn(params, batch):
    return net.apply(params, batch[0])


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

inf = jaxinf.InfluenceModel(loss_fn, params, jaxinf.arnoldi(rank=50, completion=True), damping=1e-3,
                            curvature="gauss_newton", model_fn=model_fn, output_loss=output_loss)
inf.fit((x, y))
scores = inf.influences((x_test, y_test), (x, y))
print("influences", scores.shape, "self-influence of the first 3 points:", inf.self_influence((x[:3], y[:3])))
