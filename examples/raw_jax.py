"""Raw JAX: L2-regularised logistic regression written by hand; the functional core without the wrapper."""

import jax
import jax.numpy as jnp
from _data import digits

import jaxinf

(x, y), (x_test, y_test) = digits()
params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}


def loss_fn(params, batch):
    images, labels = batch
    logits = images @ params["w"] + params["b"]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).mean()
    return nll + 1e-3 * jnp.sum(params["w"] ** 2)  # the mean loss plus a penalty


@jax.jit  # one compiled gradient-descent step
def gd_step(params, batch):
    return jax.tree.map(lambda p, g: p - 1.0 * g, params, jax.grad(loss_fn)(params, batch))


for _ in range(300):  # plain gradient descent
    params = gd_step(params, (x, y))

op = jaxinf.curvature_operator(loss_fn, params, (x, y), kind="hessian", damping=1e-3)
solver = jaxinf.cg(rtol=1e-4)  # float32: a relative residual of 1e-4 is within reach
state = solver.init(op)                                                    # a pytree
per_example_grad = jax.vmap(lambda ex: jax.grad(loss_fn)(params, jax.tree.map(lambda a: a[None], ex)))
test_grads = per_example_grad((x_test, y_test))                            # leading axis: test points
factors, info = jax.jit(jax.vmap(solver.solve, in_axes=(None, 0)))(state, test_grads)
assert bool(info.converged.all()), info
train_grads = per_example_grad((x, y))
scores = sum(jnp.einsum("i...,j...->ij", f, g) for f, g in zip(jax.tree.leaves(factors), jax.tree.leaves(train_grads)))
print("influences", scores.shape, "max |I|:", float(jnp.abs(scores).max()))
