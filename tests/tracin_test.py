"""TracIn-CP against explicit loops of jax.grad."""

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import influence
from simfluence_jax import kernels


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


def _setup():
  model = _MLP()
  inputs = jax.random.normal(jax.random.key(0), (10, 4))
  batch = {"inputs": inputs, "labels": jnp.arange(10) % 3}
  checkpoints = [model.init(jax.random.key(k), inputs) for k in range(3)]
  task = influence.ClassificationTask(model.apply)
  return task, checkpoints, batch


def _grad(task, params, batch, i, fn="loss"):
  single = jax.tree_util.tree_map(lambda x: x[i:i + 1], batch)
  grads = jax.grad(lambda p: getattr(task, fn)(p, single)[0])(params)
  return np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads)])


class TracInTest(absltest.TestCase):

  def test_equals_explicit_loops(self):
    task, checkpoints, batch = _setup()
    rates = [0.5, 0.25, 0.1]
    query = jax.tree_util.tree_map(lambda x: x[:3], batch)
    train = [jax.tree_util.tree_map(lambda x: x[:6], batch),
             jax.tree_util.tree_map(lambda x: x[6:], batch)]
    scores = influence.tracin_scores(task, checkpoints, rates, query, train,
                                     chunk_size=4)
    expected = np.zeros((3, 10))
    for params, rate in zip(checkpoints, rates):
      for q in range(3):
        for i in range(10):
          expected[q, i] += rate * _grad(task, params, query, q, "measurement") @ \
              _grad(task, params, batch, i)
    self.assertEqual(scores.shape, (3, 10))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
    self_scores = influence.tracin_self_influence(task, checkpoints, rates, train)
    pairwise = influence.tracin_scores(task, checkpoints, rates, batch, train)
    np.testing.assert_allclose(self_scores, np.diag(pairwise), rtol=1e-4, atol=1e-6)

  def test_projection_uses_one_seeded_matrix_per_checkpoint(self):
    task, checkpoints, batch = _setup()
    rng = jax.random.key(7)
    scores = influence.tracin_scores(task, checkpoints[:2], [1.0, 2.0], batch, [batch],
                                     projection_dim=16, rng=rng)
    expected = 0.0
    for k, (params, rate) in enumerate(zip(checkpoints[:2], [1.0, 2.0])):
      grads = np.stack([_grad(task, params, batch, i) for i in range(10)])
      projected = kernels.project(jnp.asarray(grads), jax.random.fold_in(rng, k), 16)
      expected = expected + rate * projected @ projected.T
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4)

  def test_raw_params_and_variables_dict_agree(self):
    task, checkpoints, batch = _setup()
    raw_task = influence.ClassificationTask(
        lambda p, x: _MLP().apply({"params": p}, x))
    raw = [c["params"] for c in checkpoints]
    np.testing.assert_allclose(
        influence.tracin_scores(raw_task, raw, [1.0] * 3, batch, batch),
        influence.tracin_scores(task, checkpoints, [1.0] * 3, batch, batch),
        rtol=1e-5)

  def test_validation(self):
    task, checkpoints, batch = _setup()
    with self.assertRaisesRegex(ValueError, "learning_rates"):
      influence.tracin_scores(task, checkpoints, [1.0], batch, [batch])
    with self.assertRaisesRegex(ValueError, "rng"):
      influence.tracin_scores(task, checkpoints, [1.0] * 3, batch, [batch],
                              projection_dim=4)


if __name__ == "__main__":
  absltest.main()
