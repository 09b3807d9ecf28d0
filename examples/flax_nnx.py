"""Flax NNX: an MLP, trained with optax; exact Gauss-Newton influence of each training digit on each test digit."""

import jax
import jax.numpy as jnp
import optax
from _data import digits
from flax import nnx

import jaxinf

(x, y), (x_test, y_test) = digits()
model = nnx.Sequential(nnx.Linear(64, 32, rngs=nnx.Rngs(0)), nnx.tanh, nnx.Linear(32, 10, rngs=nnx.Rngs(1)))
graphdef, params = nnx.split(model, nnx.Param)


def model_fn(params, batch):  # batch = (x, y); the leading axis is the examples
    return nnx.merge(graphdef, params)(batch[0])


def output_loss(logits, batch):  # the MEAN loss over the batch
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()


def loss_fn(params, batch):
    return output_loss(model_fn(params, batch), batch)


optimizer = optax.adam(1e-2)
opt_state = optimizer.init(params)


@jax.jit  # one compiled training step
def train_step(params, opt_state, batch):
    updates, opt_state = optimizer.update(jax.grad(loss_fn)(params, batch), opt_state)
    return optax.apply_updates(params, updates), opt_state


for _ in range(300):  # full-batch training
    params, opt_state = train_step(params, opt_state, (x, y))

train = [(x[i : i + 100], y[i : i + 100]) for i in range(0, len(x), 100)]  # a list of batches
inf = jaxinf.InfluenceModel(loss_fn, params, jaxinf.direct(), damping=1e-3,
                            curvature="gauss_newton", model_fn=model_fn, output_loss=output_loss)
inf.fit(train)
scores = inf.influences((x_test, y_test), train)       # (n_test, n_train); positive = helpful
suspects = jnp.argsort(-inf.self_influence(train))[:5]  # the most self-influential training points
print("influences", scores.shape, "most self-influential training points:", suspects.tolist())
