"""Sharded equals unsharded on 8 forced CPU devices: training, EK-FAC, scores.

The solver's sharded path is tested in tests/solver_sharding_test.py (2 and 4 devices).

XLA_FLAGS must be set before jax initialises (a pytest-xdist worker already has), so
one subprocess computes every case on 8 devices and writes the results; the tests
compare them.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import functools, sys
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    import ml_collections
    from jax.sharding import PartitionSpec as P
    from simfluence_jax import influence, models, sharding, training

    assert jax.device_count() == 8, jax.devices()
    out = {}
    rng = np.random.default_rng(0)

    # --- training: R=8 runs over a runs=8 mesh vs one device ----------------------
    model = models.MLPClassifier(hidden_sizes=(8,), num_classes=3)
    make = lambda n: {"inputs": rng.normal(size=(n, 5)).astype(np.float32),
                      "labels": rng.integers(0, 3, n).astype(np.int32)}
    train, test = make(20), make(6)
    params0 = models.init_variables(model, train["inputs"], seed=0)
    loss_fn = training.make_loss_fn(model, "classification")
    ids = rng.integers(-1, 20, (8, 6, 4)).astype(np.int32)
    config = ml_collections.ConfigDict(dict(optimizer="momentum", learning_rate=0.1))
    meshes = {"one": sharding.make_mesh(runs=1, data=1, devices=jax.devices()[:1]),
              "eight": sharding.make_mesh(runs=8, data=1),
              # Each run's params and momentum split over 2 and over 8 devices.
              "model2": sharding.make_mesh(runs=4, data=1, model=2),
              "model8": sharding.make_mesh(runs=1, data=1, model=8)}
    assert training.runs_shardings(8, meshes["eight"])[0].spec == P("runs")
    # The (params, optimizer state) layouts `train_runs` really compiles its segment
    # with, captured where it builds the segment.
    from simfluence_jax.training import runs as runs_lib
    make_segment_fn, captured = runs_lib.make_segment_fn, {}
    def capturing(train_step, run_sharding, shardings=None, **kwargs):
      captured["state"] = shardings
      return make_segment_fn(train_step, run_sharding, shardings, **kwargs)
    runs_lib.make_segment_fn = capturing
    for name, mesh in meshes.items():
      result = training.train_runs(params0, ids, loss_fn=loss_fn, optimizer_config=config,
                                   train_arrays=train, test_arrays=test,
                                   record_grads=True, projection_dim=8, mesh=mesh,
                                   progress=False)
      out[f"state_specs_{name}"] = np.array(sorted(
          f"{jax.tree_util.keystr(k)}={tuple(v.spec)}"
          for k, v in jax.tree_util.tree_leaves_with_path(captured["state"])))
      out[f"train_losses_{name}"] = result.trace.losses
      out[f"train_grads_{name}"] = result.trace.train_grads
      out[f"train_params_{name}"] = np.concatenate(
          [x.ravel() for x in jax.tree_util.tree_leaves(result.params)])

    # --- EK-FAC and scores on a small Transformer-like LM -------------------------
    class LM(nn.Module):
      @nn.compact
      def __call__(self, tokens):
        x = nn.Embed(11, 8)(tokens)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(
            x, mask=nn.make_causal_mask(tokens))
        return nn.Dense(11)(nn.relu(nn.Dense(12)(x)))

    lm = LM()
    def lm_batch(n, seed):
      tokens = jax.random.randint(jax.random.key(seed), (n, 7), 0, 11)
      return {"inputs": np.asarray(tokens[:, :-1]), "targets": np.asarray(tokens[:, 1:]),
              "mask": np.ones((n, 6), np.float32)}
    # 16 examples split evenly, 13 leave a remainder of 5 computed replicated.
    batches = [lm_batch(16, 1), lm_batch(13, 2)]
    queries = lm_batch(5, 3)
    params = lm.init(jax.random.key(4), batches[0]["inputs"])
    task = influence.LanguageModelingTask(lm.apply)
    layers = influence.find_layers(task.loss, params, batches[0])
    data_mesh = sharding.make_mesh(runs=1, data=8)

    # Statistics: a user-level shard_map + psum over "data" vs the whole batch.
    stats_fn = jax.jit(jax.shard_map(
        lambda b: influence.covariance_statistics(task, params, b, layers,
                                                  axis_name="data"),
        mesh=data_mesh, in_specs=P("data"), out_specs=P(), check_vma=False))
    sharded = stats_fn(sharding.put(batches[0], sharding.data_sharded(data_mesh)))
    whole = influence.covariance_statistics(task, params, batches[0], layers)
    for key in ("activation_sums", "gradient_sums", "token_counts"):
      for layer in sorted(whole._asdict()[key]):
        out[f"stats_{key}_{layer}_sharded"] = np.asarray(sharded._asdict()[key][layer])
        out[f"stats_{key}_{layer}_whole"] = np.asarray(whole._asdict()[key][layer])

    # fit_ekfac over the data mesh vs one device: eigenvalues and the damped inverse
    # applied to random gradients (both independent of eigenvector signs).
    fits = {"whole": influence.fit_ekfac(task, params, batches),
            "sharded": influence.fit_ekfac(task, params, batches, mesh=data_mesh)}
    probe = {spec.name: jnp.asarray(rng.normal(size=fits["whole"].factors[
        spec.name].eigenvalues.shape).astype(np.float32)) for spec in layers}
    for name, factors in fits.items():
      pre = influence.precondition(factors, probe, damping=1e-3)
      out[f"ekfac_precondition_{name}"] = np.concatenate(
          [np.asarray(sharding.to_host(pre[k])).ravel() for k in sorted(pre)])
      out[f"ekfac_eigenvalues_{name}"] = np.concatenate(
          [np.sort(np.asarray(sharding.to_host(f.eigenvalues)).ravel())
           for _, f in sorted(factors.factors.items())])

    # Params and factors split over "model" (4) with the examples over "data" (2).
    model_mesh = sharding.make_mesh(runs=1, data=2, model=4)
    fits["model"] = influence.fit_ekfac(task, params, batches, mesh=model_mesh)
    out["ekfac_factor_specs_model"] = np.array(sorted(
        f"{layer}.{field}={tuple(getattr(f, field).sharding.spec)}"
        for layer, f in fits["model"].factors.items() for field in f._fields))
    pre = influence.precondition(fits["model"], probe, damping=1e-3)
    out["ekfac_precondition_model"] = np.concatenate(
        [np.asarray(sharding.to_host(pre[k])).ravel() for k in sorted(pre)])
    for name in ("whole", "model"):
      out[f"ekfac_self_{name}"] = np.asarray(influence.ekfac_self_influence(
          task, params, fits[name], batches, chunk_size=12,
          mesh=None if name == "whole" else model_mesh))

    # Scores with the train examples split over "data" vs unsharded (same factors).
    factors = fits["whole"]
    for name, mesh in (("whole", None), ("sharded", data_mesh), ("model", model_mesh)):
      out[f"ekfac_scores_{name}"] = np.asarray(influence.ekfac_scores(
          task, params, factors, queries, batches, chunk_size=12, mesh=mesh))
      out[f"ekfac_token_scores_{name}"] = np.asarray(influence.ekfac_token_scores(
          task, params, factors, queries, batches, chunk_size=12, mesh=mesh))
      other = jax.tree_util.tree_map(lambda x: x * 0.9, params)
      out[f"tracin_scores_{name}"] = np.asarray(influence.tracin_scores(
          task, [params, other], [0.1, 0.05], queries, batches, projection_dim=16,
          rng=jax.random.key(5), chunk_size=12, mesh=mesh))
    # The exact-gradient TracIn path and low-rank EK-FAC queries, on "model" too
    # (one checkpoint, the evenly split batch: a layout bug shows on any input).
    for name, mesh in (("whole", None), ("model", model_mesh)):
      out[f"tracin_exact_scores_{name}"] = np.asarray(influence.tracin_scores(
          task, [other], [0.1], queries, batches[:1], chunk_size=16, mesh=mesh))
      out[f"ekfac_rank2_scores_{name}"] = np.asarray(influence.ekfac_scores(
          task, params, factors, queries, batches[:1], chunk_size=16, query_rank=2,
          mesh=mesh))

    np.savez(sys.argv[1], **out)
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_job):
  path = str(tmp_path_factory.mktemp("sharding") / "results.npz")
  env = tiny_job.env(8, SJ_SOLVER_SHARD_CPU="1")
  proc = subprocess.run([sys.executable, "-c", SCRIPT, path], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return dict(np.load(path))


def _close(results, name, a, b, rtol):
  x, y = results[f"{name}_{a}"], results[f"{name}_{b}"]
  assert x.shape == y.shape, name
  assert np.abs(y).max() > 0, name  # a real value, not an all-zero placeholder
  np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max(),
                             err_msg=name)


def test_training_runs_sharded_over_8_devices_equal_one_device(results):
  for name in ("train_losses", "train_grads", "train_params"):
    for mesh in ("eight", "model2", "model8"):
      _close(results, name, mesh, "one", 1e-5)
  assert results["train_losses_one"].shape == (8, 7, 6)
  # The runs really differ (distinct curricula), so a mix-up of runs would show.
  assert np.abs(np.diff(results["train_losses_one"][:, -1], axis=0)).max() > 1e-4


def test_ekfac_statistics_psum_over_data_equal_whole_batch(results):
  names = sorted({k.rsplit("_", 1)[0] for k in results if k.startswith("stats_")})
  assert len(names) >= 9  # 3 statistics x (>= 3 dense layers)
  for name in names:
    _close(results, name, "sharded", "whole", 1e-5)
  counts = [results[n + "_whole"] for n in names if "token_counts" in n]
  assert all(float(c) == 16 * 6 for c in counts)


def test_ekfac_factors_fitted_over_data_mesh_equal_one_device(results):
  _close(results, "ekfac_eigenvalues", "sharded", "whole", 1e-4)
  _close(results, "ekfac_precondition", "sharded", "whole", 1e-3)


def test_scores_with_train_examples_sharded_equal_unsharded(results):
  assert results["ekfac_scores_whole"].shape == (5, 29)
  assert results["tracin_scores_whole"].shape == (5, 29)
  assert results["ekfac_token_scores_whole"].shape == (5, 29, 6)
  for name in ("ekfac_scores", "ekfac_token_scores", "tracin_scores"):
    _close(results, name, "sharded", "whole", 1e-5)


def test_model_axis_splits_each_runs_state_and_the_factors(results):
  # FSDP rule: each leaf's largest dimension divisible by the axis size; the
  # momentum trace (optimizer state, index 1) is laid out like the params.
  for params_or_state in ("[0]", "[1][0].trace"):
    assert [spec for spec in results["state_specs_model2"]
            if spec.startswith(params_or_state + "['params']")] == [
        params_or_state + s for s in (
            "['params']['hidden_0']['bias']=('runs', 'model')",
            "['params']['hidden_0']['kernel']=('runs', None, 'model')",
            "['params']['logits']['bias']=('runs', None)",
            "['params']['logits']['kernel']=('runs', 'model', None)")]
  assert "[0]['params']['logits']['kernel']=('runs', 'model', None)" in list(
      results["state_specs_model8"])
  # Without a model axis the state is only split over runs.
  assert all("'model'" not in spec for spec in results["state_specs_eight"])
  specs = list(results["ekfac_factor_specs_model"])
  assert sum("'model'" in spec for spec in specs) >= len(specs) // 2, specs


def test_model_sharded_factors_and_scores_equal_unsharded(results):
  # As the data-sharded fit: eigenvectors of near-equal eigenvalues may rotate.
  _close(results, "ekfac_precondition", "model", "whole", 1e-3)
  _close(results, "ekfac_self", "model", "whole", 1e-4)
  for name in ("ekfac_scores", "ekfac_token_scores", "tracin_scores",
               "tracin_exact_scores", "ekfac_rank2_scores"):
    _close(results, name, "model", "whole", 1e-5)
