r"""The metagradient on the fitted runs: stacking, residual simulators, ρ vs R.

  python experiments/metagradient_fitted_runs.py WORKDIR SEED

The `metagradient` method uses no fitted run, so the job's 48 fitted runs are 48
more curricula it never saw. This script predicts them (`training.first_order_losses`,
as the `metagradient` stage predicts the held-out runs; cached in
WORKDIR/experiments/fitted_runs.npz with Simfluence-Linear's out-of-fold predictions
of the same runs, at the l2 the job's CV chose) and prints (docs/experiments.md):

1. stacking: `simfluence_hybrid` = α·metagradient + (1 − α)·linear with α chosen on
   the fitted runs by each rule, scored on the held-out runs;
2. residual simulators: Simfluence-Additive / -Linear fitted to the metagradient's
   errors on the fitted runs, added to its held-out predictions;
3. ρ across R runs vs R: the metagradient's spearman_across_runs on random subsets of
   R of the fitted and held-out runs together (200 subsets per R).
"""

import dataclasses
import os
import sys
import time

import numpy as np

import _workdir
from simfluence_jax import evaluation
from simfluence_jax import simulators
from simfluence_jax import training
from simfluence_jax.pipeline import stages
from simfluence_jax.simulators import _fit


def out_of_fold(config, fit, l2):
  """float32[R, T+1, M]: each fitted run simulated by a fit on the other folds."""
  folds = config.simulators.cv_folds
  fold_of_run = np.arange(fit.num_runs) % folds
  out = np.zeros(fit.losses.shape, np.float32)
  for fold in range(folds):
    rows = np.flatnonzero(fold_of_run == fold)
    sim = simulators.fit("linear", fit.select_runs(np.flatnonzero(fold_of_run != fold)),
                         l2=l2, num_phases=config.simulators.num_phases)
    held = fit.select_runs(rows)
    out[rows] = np.asarray(sim.simulate(held.batch_ids, held.losses[:, 0]))
  return out


def fitted_run_predictions(workdir, config, dataset, model, fit):
  """(metagradient, linear out-of-fold) float32[R, T+1, M] on the fitted runs."""
  cache = os.path.join(workdir, "experiments", "fitted_runs.npz")
  if os.path.exists(cache):
    saved = np.load(cache)
    return saved["metagradient"], saved["linear_oof"]
  linear = simulators.Simulator.load(
      os.path.join(workdir, "simulators", "simfluence_linear"))
  oof = out_of_fold(config, fit, linear.fit_info["cv"]["chosen_l2"])
  start = time.perf_counter()
  result = training.first_order_losses(
      model.params, stages._reference_batch_ids(config), fit.batch_ids,  # pylint: disable=protected-access
      loss_fn=model.loss_fn, config=config, train_arrays=dataset.train,
      test_arrays=dataset.test, chunk_size=config.metagradient.chunk_size,
      seed=config.seed)
  print(f"metagradient on {fit.num_runs} fitted runs: "
        f"{time.perf_counter() - start:.1f} s", flush=True)
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  np.savez(cache, metagradient=np.asarray(result.losses), linear_oof=oof)
  return np.asarray(result.losses), oof


def _weight(rule, mg, lin, actual):
  """α (scalar, or float[M] per test example) of one stacking rule, from fitted runs."""
  d, r = mg - lin, actual - lin
  if rule == "equal (today)":
    return 0.5
  if rule == "least squares, all steps":
    return float(np.clip(np.sum(d[:, 1:] * r[:, 1:]) / np.sum(d[:, 1:] ** 2), 0, 1))
  if rule == "least squares per test example":
    return np.clip(np.sum(d[:, 1:] * r[:, 1:], (0, 1)) / np.sum(d[:, 1:] ** 2, (0, 1)),
                   0, 1)
  grid = np.linspace(0, 1, 21)  # "best ρ on a grid"
  return float(grid[int(np.argmin([_fit.cv_score("spearman_across_runs",
                                                 a * mg + (1 - a) * lin, actual)
                                    for a in grid]))])


def main(workdir, seed):
  seed = int(seed)
  config, dataset, model, held, fit, blind = _workdir.held_out(workdir, seed)
  mg_fit, lin_oof = fitted_run_predictions(workdir, config, dataset, model, fit)
  pred = lambda name: np.load(os.path.join(workdir, "evaluation", f"pred_{name}.npy"))
  mg, lin = pred("metagradient"), pred("simfluence_linear")
  score = lambda p: (f"ρ {evaluation.spearman_across_runs(p, held.losses):.3f} "
                     f"MSE ratio {evaluation.all_steps_mse(p, held.losses) / blind:.3f}")
  print(f"seed {seed}, fitted runs: metagradient "
        f"ρ {-_fit.cv_score('spearman_across_runs', mg_fit, fit.losses):.3f}, "
        f"linear out of fold ρ {-_fit.cv_score('spearman_across_runs', lin_oof, fit.losses):.3f}")
  print("1. stacking (α from the fitted runs, scored on the held-out runs)")
  for rule in ("equal (today)", "least squares, all steps",
               "least squares per test example", "best ρ on a grid"):
    alpha = _weight(rule, mg_fit, lin_oof, fit.losses)
    print(f"  {rule}: mean α {np.mean(alpha):.2f}, "
          f"{score(alpha * mg + (1 - alpha) * lin)}")
  print("2. residual simulators (fitted to actual − metagradient on the fitted runs)")
  for kind in ("additive", "linear"):
    offset = 10.0 if kind == "linear" else 0.0  # keep the linear rollout off L = 0
    sim = simulators.fit_cv(kind, dataclasses.replace(
        fit, losses=fit.losses - mg_fit + offset), l2_grid=(0.1, 1, 10, 100, 1000),
                            num_folds=4)
    residual = np.asarray(sim.simulate(
        held.batch_ids, np.full_like(held.losses[:, 0], offset))) - offset
    print(f"  {kind} (l2 {sim.fit_info['cv']['chosen_l2']}): metagradient + residual "
          f"{score(mg + residual)}; its mean with linear {score(0.5 * (mg + residual + lin))}")
  print("3. the metagradient's ρ across R runs (fitted + held-out, random subsets)")
  both_pred, both_actual = np.concatenate([mg_fit, mg]), np.concatenate(
      [fit.losses, held.losses])
  rng = np.random.default_rng(seed)
  total = len(both_pred)
  for size in (8, 16, 32, 48, total):
    values = [evaluation.spearman_across_runs(both_pred[i], both_actual[i])
              for i in (rng.choice(total, size, replace=False)
                        for _ in range(200 if size < total else 1))]
    print(f"  R = {size}: {np.mean(values):.3f} ± {np.std(values):.3f}")


if __name__ == "__main__":
  main(*sys.argv[1:])
