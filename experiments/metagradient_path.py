r"""Metagradients integrated along the path from the full-batch reference to a curriculum.

  python experiments/metagradient_path.py WORKDIR SEED [CHUNK]

Along the straight path e(s) = e_ref + s (e_c − e_ref) from the full-batch reference
run's per-slot coefficients to curriculum c's (`metagradient_second_order.make_path`),

    L(1) − L(0) = ∫₀¹ L'(s) ds,

and the `metagradient` method is the left-point rule L(0) + L'(0). Quadrature rules
place the derivative inside the path instead, where the run is closer to the
curriculum's: midpoint L(0) + L'(½) (exact for quadratic L(s)), two-point
Gauss–Legendre, Simpson. Each point costs one jvp through a run whose primal depends
on the curriculum (unlike s = 0, whose primal all curricula share). Also printed:
the first-order expansion around the midpoint, L(½) + ½ L'(½), and L(1) against the
recorded run (a check: the path's end is the curriculum's own run). Prints, for the
held-out curricula, the time per point and each rule's spearman_across_runs and
all_steps_mse / curriculum_blind's; saves the values to WORKDIR/path_terms.npz.
"""

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import _workdir
import metagradient_second_order
from simfluence_jax import evaluation
from simfluence_jax.pipeline import stages

GAUSS2 = (0.5 - 0.5 / np.sqrt(3.0), 0.5 + 0.5 / np.sqrt(3.0))
POINTS = (0.0, GAUSS2[0], 0.5, GAUSS2[1], 1.0)


def path_values(path_fn, curricula, point, chunk_size):
  """(L(s), L'(s)) float32[R', T+1, M] each, at s = `point`, for every curriculum."""

  def one(ids_c, coefficients_c):
    path = functools.partial(path_fn, ids_c=ids_c, coefficients_c=coefficients_c)
    return jax.jvp(path, (jnp.float32(point),), (jnp.float32(1.0),))

  compiled = jax.jit(jax.vmap(one))
  values, slopes = [], []
  for start in range(0, len(curricula), chunk_size):
    index = np.minimum(np.arange(start, start + chunk_size), len(curricula) - 1)
    ids = jnp.asarray(curricula[index])
    coefficients = jnp.full(ids.shape, 1.0 / ids.shape[-1], jnp.float32)
    value, slope = compiled(ids, coefficients)
    keep = len(curricula) - start
    values.append(np.asarray(value)[:keep])
    slopes.append(np.asarray(slope)[:keep])
  return np.concatenate(values), np.concatenate(slopes)


def main(workdir, seed, chunk_size="8"):
  config, dataset, model, held, _, blind = _workdir.held_out(workdir, int(seed),
                                                             no_padding=True)
  reference_ids = jnp.asarray(stages._reference_batch_ids(config))  # pylint: disable=protected-access
  path_fn = metagradient_second_order.make_path(
      model.params, model.loss_fn, config, reference_ids, dataset.train, dataset.test)
  value, slope = {}, {}
  for point in POINTS:
    start = time.perf_counter()
    value[point], slope[point] = path_values(path_fn, held.batch_ids, point,
                                             int(chunk_size))
    print(f"seed {seed}: s={point:.3f} took {time.perf_counter() - start:.1f}s for "
          f"{held.num_runs} curricula", flush=True)
  np.savez(os.path.join(workdir, "path_terms.npz"),
           points=np.array(POINTS), values=np.stack([value[p] for p in POINTS]),
           slopes=np.stack([slope[p] for p in POINTS]))
  base = value[0.0]
  rules = {
      "first order (left point)": base + slope[0.0],
      "midpoint": base + slope[0.5],
      "gauss-legendre 2": base + 0.5 * (slope[GAUSS2[0]] + slope[GAUSS2[1]]),
      "simpson": base + (slope[0.0] + 4 * slope[0.5] + slope[1.0]) / 6,
      "expansion at midpoint": value[0.5] + 0.5 * slope[0.5],
  }
  print(f"  L(1) vs recorded runs: max |diff| {np.abs(value[1.0] - held.losses).max():.2e}")
  linear = np.load(os.path.join(workdir, "evaluation", "pred_simfluence_linear.npy"))
  for name, pred in rules.items():
    print(f"  {name:<26} rho {evaluation.spearman_across_runs(pred, held.losses):.3f} "
          f"mse_ratio {evaluation.all_steps_mse(pred, held.losses) / blind:.3f} "
          f"hybrid rho "
          f"{evaluation.spearman_across_runs(0.5 * (pred + linear), held.losses):.3f}",
          flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
