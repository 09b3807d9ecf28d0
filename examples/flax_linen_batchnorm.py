"""Flax Linen with BatchNorm and Dropout: influence in eval mode (running statistics, no dropout).

The loss closes over the fixed ``batch_stats`` and calls the model with
``train=False``: influence is taken with respect to the trainable ``params``
at the trained point, with the network as it predicts.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _data import digits

import jaxinf


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(10)(x)


(x, y), (x_test, y_test) = digits()
net = MLP()
variables = net.init({"params": jax.random.key(0)}, x[:2], train=False)
params, batch_stats = variables["params"], variables["batch_stats"]


def train_loss(params, batch_stats, batch, key):
    logits, updates = net.apply({"params": params, "batch_stats": batch_stats}, batch[0], train=True,
                                mutable=["batch_stats"], rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(), updates["batch_stats"]


optimizer = optax.adam(1e-2)
opt_state = optimizer.init(params)


@jax.jit  # one compiled training step: new running statistics, dropout on
def train_step(params, batch_stats, opt_state, batch, key):
    (_, batch_stats), grads = jax.value_and_grad(train_loss, has_aux=True)(params, batch_stats, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), batch_stats, opt_state


key = jax.random.key(1)
for step in range(200):
    params, batch_stats, opt_state = train_step(params, batch_stats, opt_state, (x, y), jax.random.fold_in(key, step))


def model_fn(params, batch):  # eval mode: running statistics, dropout off
    return net.apply({"params": params, "batch_stats": batch_stats}, batch[0], train=False)


def output_loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()


def loss_fn(params, batch):
    return output_loss(model_fn(params, batch), batch)


inf = jaxinf.InfluenceModel(loss_fn, params, jaxinf.ekfac(), damping=1e-3,
                            curvature="gauss_newton", model_fn=model_fn, output_loss=output_loss)
inf.fit((x, y))
scores = inf.influences((x_test, y_test), (x, y))
print("influences", scores.shape, "most harmful training point for test #0:", int(jnp.argmin(scores[0])))
