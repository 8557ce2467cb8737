"""One sharded code path: the kernels on 1 and 8 forced CPU devices agree to 1e-5.

XLA_FLAGS must be set before jax initialises, so one subprocess computes every case
on meshes with `data` = 1 and 8 (and with mesh=None, the default device) and
writes the results; the tests compare them. Batches of 13 and 16 examples with
chunks of 6 leave padded chunks on every mesh size, and the true Fisher samples
per example, so even it does not depend on the mesh.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

# The model, data and params: the script's and, for the factors it saves, this
# process's (one device).
MODEL = textwrap.dedent("""
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from simfluence_jax import influence

    class LM(nn.Module):
      @nn.compact
      def __call__(self, tokens):
        x = nn.Embed(11, 8)(tokens)
        x = nn.Conv(8, (2,), padding="CAUSAL")(nn.LayerNorm()(x))
        return nn.Dense(11)(nn.relu(nn.Dense(12)(x)))

    def lm_batch(n, seed):
      tokens = jax.random.randint(jax.random.key(seed), (n, 7), 0, 11)
      return {"inputs": np.asarray(tokens[:, :-1]), "targets": np.asarray(tokens[:, 1:]),
              "mask": np.ones((n, 6), np.float32)}

    model = LM()
    batches = [lm_batch(16, 1), lm_batch(13, 2)]
    queries = lm_batch(5, 3)
    params = model.init(jax.random.key(4), batches[0]["inputs"])
    other = jax.tree_util.tree_map(lambda x: x * 0.9, params)
    task = influence.LanguageModelingTask(model.apply)
""")

SCRIPT = MODEL + textwrap.dedent("""
    import sys
    from simfluence_jax import sharding
    from simfluence_jax.influence import _ekfac, _tracin

    assert jax.device_count() == 8, jax.devices()
    layers = influence.find_layers(task.loss, params, batches[0], kinds="all",
                                   warn=False)
    probe = None
    out = {}
    meshes = {"default": None,
              "d1": sharding.make_mesh(runs=1, data=1, devices=jax.devices()[:1]),
              "d8": sharding.make_mesh(runs=1, data=8)}
    for name, mesh in meshes.items():
      kw = dict(chunk_size=6, mesh=mesh)
      for fisher in ("empirical", "true"):
        factors = influence.fit_ekfac(task, params, batches, fisher=fisher,
                                      rng=jax.random.key(7), layers=layers, **kw)
        if probe is None:
          probe = {s.name: jnp.asarray(np.random.default_rng(0).normal(
              size=factors.factors[s.name].eigenvalues.shape).astype(np.float32))
                   for s in layers}
        pre = influence.precondition(factors, probe, damping=1e-3)
        out[f"precondition_{fisher}_{name}"] = np.concatenate(
            [np.asarray(pre[k]).ravel() for k in sorted(pre)])
        out[f"eigenvalues_{fisher}_{name}"] = np.concatenate(
            [np.sort(np.asarray(f.eigenvalues).ravel())
             for _, f in sorted(factors.factors.items())])
      # Where the params are placed (split over 8 devices or not) must not change
      # the checksum the factors compare them by.
      out[f"values_checksum_{name}"] = np.array(
          [int(factors.values_checksum[i:i + 8], 16)
           for i in range(0, len(factors.values_checksum), 8)], np.int64)
      out[f"ekfac_scores_{name}"] = np.asarray(influence.ekfac_scores(
          task, params, factors, queries, batches, **kw))
      out[f"ekfac_token_scores_{name}"] = np.asarray(influence.ekfac_token_scores(
          task, params, factors, queries, batches, query_rank=3, **kw))
      out[f"ekfac_self_{name}"] = np.asarray(influence.ekfac_self_influence(
          task, params, factors, batches, **kw))
      out[f"tracin_scores_{name}"] = np.asarray(influence.tracin_scores(
          task, [params, other], [0.1, 0.05], queries, batches, **kw))
      out[f"tracin_projected_{name}"] = np.asarray(influence.tracin_scores(
          task, [params, other], [0.1, 0.05], queries, batches, projection_dim=16,
          rng=jax.random.key(5), **kw))
      out[f"tracin_self_{name}"] = np.asarray(influence.tracin_self_influence(
          task, [params, other], [0.1, 0.05], batches, **kw))
    # Compiled once per kernel and chunk shape: 5 chunks per call, 3 meshes, and
    # one compiled program per (kernel, mesh) in each jit cache.
    kernel = _ekfac._score_kernel(task, factors.layers, "total", meshes["d8"])
    out["score_kernel_cache_size"] = np.asarray(kernel._cache_size())
    plan = next(iter(_tracin._plans.values()))
    out["tracin_kernel_cache_size"] = np.asarray(
        _tracin._chunk_kernel(task, plan, meshes["d8"])._cache_size())
    # The same calls with the params placed otherwise: split over the mesh, or on
    # another device (the independence check's program was compiled for the first
    # placement it saw, and refused the others: review h34).
    for name, placed in (
        ("split", jax.device_put(params, sharding.param_shardings(
            params, sharding.make_mesh(runs=1, data=1, model=8)))),
        ("device1", jax.device_put(params, jax.devices()[1]))):
      out[f"tracin_scores_{name}"] = np.asarray(influence.tracin_scores(
          task, [placed, other], [0.1, 0.05], queries, batches, **kw))
      out[f"ekfac_self_{name}"] = np.asarray(influence.ekfac_self_influence(
          task, placed, influence.fit_ekfac(  # as the last fit above
              task, placed, batches, fisher="true", rng=jax.random.key(7),
              layers=layers, **kw), batches, **kw))
    # Factors fitted on 8 devices, saved, for a process with one to load.
    influence.save_factors(sys.argv[2], factors)
    out["ekfac_scores_saved"] = np.asarray(influence.ekfac_scores(
        task, params, factors, queries, batches, chunk_size=6))
    np.savez(sys.argv[1], **out)
""")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_job):
  folder = tmp_path_factory.mktemp("influence_sharding")
  env = tiny_job.env(8)
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(folder / "results.npz"),
                         str(folder / "factors")], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return folder


@pytest.fixture(scope="module")
def results(run_dir):
  return dict(np.load(run_dir / "results.npz"))


NAMES = ("eigenvalues_empirical", "precondition_empirical", "eigenvalues_true",
         "precondition_true", "ekfac_scores", "ekfac_token_scores", "ekfac_self",
         "tracin_scores", "tracin_projected", "tracin_self")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mesh", ["d1", "d8"])
def test_every_mesh_equals_the_default_device(results, name, mesh):
  expected, got = results[f"{name}_default"], results[f"{name}_{mesh}"]
  assert got.shape == expected.shape
  assert np.abs(expected).max() > 0, name  # a real value, not a placeholder
  tolerance = 1e-4 if name.startswith(("eigenvalues", "precondition")) else 1e-5
  np.testing.assert_allclose(got, expected, rtol=tolerance,
                             atol=tolerance * np.abs(expected).max(), err_msg=name)


def test_the_values_checksum_is_the_same_on_every_mesh(results):
  expected = results["values_checksum_default"]
  # Two sums per parameter leaf (zero for the zero-initialised biases).
  assert expected.size % 2 == 0 and np.count_nonzero(expected) >= expected.size // 2
  for mesh in ("d1", "d8"):
    np.testing.assert_array_equal(results[f"values_checksum_{mesh}"], expected)


def test_shapes_and_compile_once(results):
  assert results["ekfac_scores_default"].shape == (5, 29)
  assert results["ekfac_token_scores_default"].shape == (5, 29, 6)
  assert results["tracin_self_default"].shape == (29,)
  assert int(results["score_kernel_cache_size"]) == 1
  assert int(results["tracin_kernel_cache_size"]) == 1


@pytest.mark.parametrize("placement", ["split", "device1"])
def test_params_placed_otherwise_give_the_same_scores(results, placement):
  for name in ("tracin_scores", "ekfac_self"):
    expected = results[f"{name}_d8"]
    np.testing.assert_allclose(results[f"{name}_{placement}"], expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max(), err_msg=name)


def test_factors_fitted_on_8_devices_load_on_one(run_dir, results):
  import jax  # pylint: disable=g-import-not-at-top
  from simfluence_jax import influence  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 1
  model = {}
  exec(MODEL, model)  # pylint: disable=exec-used
  factors = influence.load_factors(str(run_dir / "factors"))
  got = influence.ekfac_scores(model["task"], model["params"], factors,
                               model["queries"], model["batches"], chunk_size=6)
  expected = results["ekfac_scores_saved"]
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5,
                             atol=1e-5 * np.abs(expected).max())
