"""The main job's influence stages on a model with frozen non-parameter collections.

`training.make_loss_fn` trains the `"params"` collection alone and passes the others
(BatchNorm `batch_stats`) behind stop_gradient; the influence kernels refuse a
variables dict holding them (they would differentiate the running statistics too).
The stages hand the kernels `"params"` alone and close over the rest
(`stages._task`, `stages._trainable`): checked against per-example gradients with
respect to `"params"` only, the statistics held at their (non-trivial) values.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax import influence
from simfluence_jax import losses
from simfluence_jax import training
from simfluence_jax.pipeline import stages


class _BatchNormMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    return nn.Dense(3)(nn.tanh(x))


def _model_and_data():
  rng = np.random.default_rng(0)
  train = {"inputs": rng.normal(size=(10, 4)).astype(np.float32),
           "labels": rng.integers(0, 3, 10).astype(np.int32)}
  test = {"inputs": rng.normal(size=(3, 4)).astype(np.float32),
          "labels": rng.integers(0, 3, 3).astype(np.int32)}
  module = _BatchNormMLP()
  variables = module.init(jax.random.key(0), train["inputs"])
  stats = variables["batch_stats"]["BatchNorm_0"]
  variables = {"params": variables["params"], "batch_stats": {"BatchNorm_0": {
      "mean": jnp.asarray(rng.normal(size=6), jnp.float32),
      "var": jnp.asarray(rng.uniform(0.2, 3.0, 6), jnp.float32)}}}
  assert jax.tree.map(jnp.shape, stats) == jax.tree.map(
      jnp.shape, variables["batch_stats"]["BatchNorm_0"])
  model = stages.Model(module=module,
                       loss_fn=training.make_loss_fn(module, "classification"),
                       params=variables, kind="classification")
  return model, train, test


def _grads(module, variables, batch, dense_only=False):
  """float64[n, P] per-example gradients w.r.t. "params" (loop of jax.grad); with
  `dense_only` those of the Dense layers alone (EK-FAC's blocks)."""
  rows = []
  for i in range(len(batch["labels"])):
    def loss(params, i=i):
      logits = module.apply({"params": params,
                             "batch_stats": variables["batch_stats"]},
                            batch["inputs"][i:i + 1])
      return losses.classification_loss(logits, batch["labels"][i:i + 1])[0]
    grad = jax.grad(loss)(variables["params"])
    leaves = jax.tree_util.tree_leaves_with_path(grad)
    rows.append(np.concatenate([
        np.ravel(g) for path, g in leaves
        if not dense_only or "Dense" in jax.tree_util.keystr(path)]))
  return np.asarray(rows, np.float64)


def test_tracin_of_the_stages_differentiates_params_alone_at_the_frozen_stats():
  model, train, test = _model_and_data()
  task = stages._task(model)
  scores = influence.tracin_scores(task, [stages._trainable(model.params)], [0.5],
                                   test, [train])
  want = 0.5 * _grads(model.module, model.params, test) @ _grads(
      model.module, model.params, train).T
  np.testing.assert_allclose(np.asarray(scores), want, rtol=2e-4, atol=1e-6)
  # The whole variables dict is refused by the kernels: the stages must not pass it.
  with pytest.raises(ValueError, match="batch_stats"):
    influence.tracin_scores(task, [model.params], [0.5], test, [train])


def test_ekfac_of_the_stages_fits_and_scores_with_the_frozen_stats():
  model, train, test = _model_and_data()
  task, params = stages._task(model), stages._trainable(model.params)
  influence._layers._warned_messages.clear()  # pylint: disable=protected-access  # once per process
  with pytest.warns(UserWarning, match="BatchNorm_0"):  # not a Kronecker block
    factors = influence.fit_ekfac(task, params, [train])
  scores = np.asarray(influence.ekfac_scores(task, params, factors, test, [train],
                                             damping=1e3))
  # Heavily damped, (G + λI)⁻¹ ≈ I/λ: the scores approach TracIn's dot products.
  want = _grads(model.module, model.params, test, True) @ _grads(
      model.module, model.params, train, True).T / 1e3
  np.testing.assert_allclose(scores, want, rtol=0.05, atol=1e-7)
