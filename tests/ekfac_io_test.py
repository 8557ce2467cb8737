"""EK-FAC factors saved with orbax and loaded back exactly."""

import functools
import json
import os
import shutil
import tempfile

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import influence


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.DenseGeneral(6, axis=(-2, -1))(x))
    return nn.Dense(3)(x)


@functools.lru_cache(maxsize=None)  # Fitted once for all tests (read-only).
def _setup():
  model = _MLP()
  inputs = jax.random.normal(jax.random.key(0), (16, 2, 3))
  batch = {"inputs": inputs, "labels": jnp.arange(16) % 3}
  params = model.init(jax.random.key(1), inputs)
  task = influence.ClassificationTask(model.apply)
  return task, params, batch, influence.fit_ekfac(task, params, [batch])


class FactorsIoTest(absltest.TestCase):

  def _tempdir(self):
    # Not absltest's create_tempdir: it reads absl flags, unparsed under pytest.
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def test_round_trip_is_exact(self):
    task, params, batch, factors = _setup()
    path = os.path.join(self._tempdir(), "factors")
    influence.save_factors(path, factors)
    loaded = influence.load_factors(path)
    self.assertEqual(loaded.layers, factors.layers)
    self.assertEqual(list(loaded.factors), list(factors.factors))
    for name, original in factors.factors.items():
      for got, expected in zip(loaded.factors[name], original):
        self.assertEqual(got.dtype, expected.dtype)
        np.testing.assert_array_equal(got, expected)
    query = jax.tree_util.tree_map(lambda x: x[:3], batch)
    np.testing.assert_array_equal(
        influence.ekfac_scores(task, params, loaded, query, [batch]),
        influence.ekfac_scores(task, params, factors, query, [batch]))

  def test_refuses_to_overwrite_unless_asked(self):
    _, _, _, factors = _setup()
    path = self._tempdir()
    influence.save_factors(path, factors)  # An empty existing directory is fine.
    with self.assertRaisesRegex(FileExistsError, "overwrite"):
      influence.save_factors(path, factors)
    scaled = jax.tree_util.tree_map(lambda x: 2 * x, factors)
    influence.save_factors(path, scaled, overwrite=True)
    loaded = influence.load_factors(path)
    np.testing.assert_array_equal(
        loaded.factors["Dense_0"].eigenvalues, scaled.factors["Dense_0"].eigenvalues)

  def test_missing_and_corrupt_directories(self):
    root = self._tempdir()
    missing = os.path.join(root, "nowhere")
    with self.assertRaisesRegex(FileNotFoundError, "nowhere"):
      influence.load_factors(missing)
    empty = os.path.join(root, "empty")
    os.makedirs(empty)
    with self.assertRaisesRegex(ValueError, "empty"):
      influence.load_factors(empty)
    _, _, _, factors = _setup()
    path = os.path.join(root, "saved")
    influence.save_factors(path, factors)
    metadata = os.path.join(path, "factors.json")
    with open(metadata) as f:
      content = json.load(f)
    content["layers"][0].pop("kind")
    with open(metadata, "w") as f:
      json.dump(content, f)
    with self.assertRaisesRegex(ValueError, "saved"):
      influence.load_factors(path)
    with open(metadata, "w") as f:
      f.write("{not json")
    with self.assertRaisesRegex(ValueError, "corrupt"):
      influence.load_factors(path)


if __name__ == "__main__":
  absltest.main()
