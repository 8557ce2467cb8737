r"""Metagradients averaged over references near the full batch (shared primals).

  python experiments/metagradient_smoothed.py WORKDIR SEED [K] [SIGMA]

`experiments/metagradient_path.py` found the test losses rough along the path from the
full-batch reference e̅ to a curriculum: derivatives at interior points differ, and
averaging the derivative at s = 0 with one at s = 0.21 raised seed 0's across-run ρ
from 0.919 to 0.933. Those interior points depend on the curriculum (a training run
each), so they cost more than retraining it. Here the points are shared:

    p_k = e̅ + σ (e_{c_k} − e̅),   k = 1..K,

with c_k random curricula drawn like the job's (their batch ids only, no runs). Every
held-out curriculum c is expanded around each p_k by `training.first_order_losses`
(one jvp per curriculum and point, the primal shared as for e̅), and the tangents are
re-centred on e̅:

    L̂(c) = L(e̅) + (1/K) Σ_k J(p_k)·(e_c − e̅),
    J(p_k)·(e_c − e̅) = J(p_k)·(e_c − p_k) + σ/(1 − σ) · J(p_k)·(e_{c_k} − p_k),

the last term from expanding c_k itself around p_k. `include_center` adds p_0 = e̅
(the `metagradient` method) as one of the points. Prints each variant's
spearman_across_runs and all_steps_mse / curriculum_blind's, and the time per point.
"""

import sys
import time

import numpy as np

import _workdir
from simfluence_jax import evaluation
from simfluence_jax import training
from simfluence_jax.pipeline import stages


def smoothed_reference(num_train, curriculum, sigma):
  """(ids int32[T, N + B], weights float32[T, N + B]) of e̅ + σ(e_c − e̅): every
  train id, then c's batch; step coefficients are weight / (N + B)."""
  num_steps, batch = curriculum.shape
  ids = np.concatenate([np.tile(np.arange(num_train, dtype=np.int32),
                                (num_steps, 1)), curriculum], axis=1)
  slots = num_train + batch
  weights = np.concatenate([
      np.full((num_steps, num_train), (1.0 - sigma) * slots / num_train),
      np.full((num_steps, batch), sigma * slots / batch)], axis=1)
  return ids, weights.astype(np.float32)


def main(workdir, seed, num_points="2", sigma="0.2"):
  num_points, sigma = int(num_points), float(sigma)
  config, dataset, model, held, fit, blind = _workdir.held_out(workdir, int(seed))
  num_train = config.num_train_examples
  common = dict(loss_fn=model.loss_fn, config=config, train_arrays=dataset.train,
                test_arrays=dataset.test, chunk_size=config.metagradient.chunk_size,
                seed=config.seed)
  start = time.perf_counter()
  center = training.first_order_losses(
      model.params, stages._reference_batch_ids(config), held.batch_ids, **common)  # pylint: disable=protected-access
  print(f"seed {seed}: center took {time.perf_counter() - start:.1f}s", flush=True)
  base = center.reference_losses[None]
  tangents = [center.losses - base]  # J(e̅)·(e_c − e̅)
  # Directions: curricula drawn like the job's, after the ones it uses.
  rng = np.random.default_rng([int(seed), 7919])
  for k in range(num_points):
    direction = fit.batch_ids[rng.integers(fit.num_runs)]
    direction = rng.permutation(num_train)[direction]  # a fresh relabelled curriculum
    ids, weights = smoothed_reference(num_train, direction, sigma)
    start = time.perf_counter()
    result = training.first_order_losses(
        model.params, ids, np.concatenate([held.batch_ids, direction[None]]),
        reference_weights=weights, **common)
    point = result.reference_losses[None]
    own = result.losses[:-1] - point  # J(p_k)·(e_c − p_k)
    toward = result.losses[-1:] - point  # J(p_k)·(e_{c_k} − p_k)
    tangents.append(own + sigma / (1.0 - sigma) * toward)
    print(f"  point {k}: {time.perf_counter() - start:.1f}s; "
          f"|L(p_k) − L(e̅)| final {np.abs(point - base)[0, -1].mean():.3f}",
          flush=True)
  variants = {
      "center (metagradient)": base + tangents[0],
      f"{num_points} smoothed points": base + np.mean(tangents[1:], axis=0),
      f"center + {num_points} points": base + np.mean(tangents, axis=0),
  }
  for k in range(1, num_points + 1):
    variants[f"point {k - 1} alone"] = base + tangents[k]
  for name, pred in variants.items():
    print(f"  {name:<26} rho {evaluation.spearman_across_runs(pred, held.losses):.3f} "
          f"mse_ratio {evaluation.all_steps_mse(pred, held.losses) / blind:.3f}",
          flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
