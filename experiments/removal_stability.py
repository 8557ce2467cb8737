r"""MAGIC's removal benchmark against the step size: where the reference run is stable.

  python experiments/removal_stability.py OUTDIR SEED LEARNING_RATE \
      [SCHEDULE [WARMUP_STEPS]]

For `configs/default.py` with the given seed and optimizer settings (in its own
workdir `OUTDIR/<settings>/`, so the removal runs are reused by a rerun), prints:

* the metagradient's removal LDS at 1% and 5% (the main job's `removal_lds`);
* `training.derivative_growth` of the reference run (fitted run 0);
* the mean test-loss drop and the across-run std of the final test losses over
  the first 8 fitted curricula (the main job's `regime` uses all 48);
* η·λ_max at the base model: the largest Hessian eigenvalue (power iteration, 40
  or 80 Hessian-vector products) of the mean loss over every train example and over the
  reference run's first batch, times the peak step size. SGD is unstable along a
  direction with η·λ > 2.

The numbers are in docs/experiments.md ("Removal benchmark: the reference run's
stability").
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import config_lib
from simfluence_jax import evaluation
from simfluence_jax import training
from simfluence_jax.pipeline import stages
from simfluence_jax.pipeline import workdir as workdir_lib


def top_eigenvalue(loss, params, iterations=40):
  """The largest Hessian eigenvalue of `loss` at `params` (power iteration).

  Power iteration finds the eigenvalue of largest magnitude; when that one is
  negative, it runs again on H − λ·I, whose largest-magnitude eigenvalue is then
  λ_max − λ > 0.
  """
  hvp = jax.jit(lambda v: jax.jvp(jax.grad(loss), (params,), (v,))[1])
  leaves = lambda tree: jax.tree_util.tree_leaves(tree)
  dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(leaves(a), leaves(b)))

  def power(shift):
    vector = jax.tree_util.tree_map(
        lambda x: jax.random.normal(jax.random.PRNGKey(0), x.shape, x.dtype), params)
    value = 0.0
    for _ in range(iterations):
      product = jax.tree_util.tree_map(lambda h, v: h - shift * v, hvp(vector),
                                       vector)
      value = float(dot(vector, product) / dot(vector, vector))
      norm = jnp.sqrt(dot(product, product))
      vector = jax.tree_util.tree_map(lambda x, norm=norm: x / norm, product)
    return value + shift

  value = power(0.0)
  return value if value >= 0 else power(value)


def main(outdir, seed, learning_rate, schedule="constant", warmup_steps="0"):
  config = config_lib.load_config("configs/default.py")
  config.seed, config.learning_rate = int(seed), float(learning_rate)
  config.lr_schedule, config.warmup_steps = schedule, int(warmup_steps)
  name = f"seed{seed}_lr{learning_rate}_{schedule}_warmup{warmup_steps}"
  wd = workdir_lib.Workdir(os.path.join(outdir, name), config)
  dataset = stages.load_data(wd, config)
  model = stages.base_model(wd, config, dataset)
  curricula = stages.make_curricula(config)
  start = time.perf_counter()
  removals = stages.removal_runs(wd, config, dataset, model, curricula)
  table = training.metagradients(
      model.params, removals.reference_ids[None], loss_fn=model.loss_fn,
      config=config, train_arrays=dataset.train, test_arrays=dataset.test,
      cotangents_at_once=config.metagradient.cotangents_at_once)[0]
  lds = {label: evaluation.removal_lds(
      np.einsum("stb,tbm->sm", weights - 1.0, table), removals.actual_change[label])
         for label, weights in removals.weights.items()}
  runs = training.train_runs(
      model.params, curricula.fit[:8], loss_fn=model.loss_fn, config=config,
      train_arrays=dataset.train, test_arrays=dataset.test, seed=config.seed)
  losses = np.asarray(runs.trace.losses)
  growth = training.derivative_growth(table, runs.trace.learning_rates[0])
  train = jax.tree_util.tree_map(jnp.asarray, dataset.train)
  first = jax.tree_util.tree_map(lambda x: x[removals.reference_ids[0]], train)
  sharpness = [config.learning_rate * top_eigenvalue(
      lambda p, batch=batch: model.loss_fn(p, batch).mean(), model.params)
               for batch in (train, first)]
  print(f"{name}: removal LDS " + ", ".join(f"{k} {v:.3f}" for k, v in lds.items())
        + f"; derivative growth {growth:.2f}; loss drop "
        f"{1 - losses[:, -1].mean() / losses[:, 0].mean():.3f}, across-run std "
        f"{losses[:, -1].std(0).mean():.3f} (8 runs); η·λ_max at the base: all "
        f"examples {sharpness[0]:.2f}, first batch {sharpness[1]:.2f} "
        f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
