r"""Retrain only the last k steps: what the rough regime's deciding steps cost.

  python experiments/late_restart.py WORKDIR SEED [CONFIG] [K,...] [J]

Hypothesis: in `configs/default.py:rough` the last ~8 steps decide a run's final
losses (docs/experiments.md, "The rough regime"), and a late batch's effect depends
more on the batch than on the exact parameters it meets. Then, for each held-out
curriculum h, training its last k batches from the parameters a *fitted* run j had
at step T−k (a checkpoint every simulator's fitting runs could keep) predicts L_T(h)
well, at a cost of k/T of a run per curriculum and start.

For every k and each of the first J fitted runs j, the held-out curricula are spliced
(run j's batches for steps < T−k, h's from T−k on) and retrained in full here, which
equals a restart from j's step T−k state (constant lr, SGD, no dropout: the same
arithmetic); the cost counted is the restart's k/T. Predictions of L_t, t ≥ T−k:

* `restart`: the mean over starts j of the spliced runs' losses;
* `restart+linear`: the same, plus Simfluence-Linear's (l2 10) estimate of what the
  state difference at T−k changes: Linear rolled out over h's last k batches from its
  own prediction L̂_{T−k}(h) minus from j's actual L_{T−k}(j).

Before T−k both use Simfluence-Linear's rollout. Prints spearman_across_runs and
all_steps_mse (with the ratio to curriculum_blind) beside Linear's, and the cost in
run-equivalents (fitted runs + restarts).
"""

import sys
import time

import numpy as np

from simfluence_jax import config_lib
from simfluence_jax import evaluation
from simfluence_jax import simulators
from simfluence_jax import training

sys.path.insert(0, "experiments")
import _workdir  # pylint: disable=g-import-not-at-top


def _linear_rollout(linear, ids, start_losses, first, last):
  """Simfluence-Linear's losses [R, last-first+1, M] over steps first..last of
  `ids` [R, T, B], from `start_losses` [R, M] at step `first`."""
  return np.asarray(linear.simulate(ids[:, first:last], start_losses))


def main(workdir, seed, config_path="configs/default.py:rough", ks="2,4,8,16",
         num_starts="2"):
  config = config_lib.load_config(config_path)
  config.seed = int(seed)
  _, _, dataset, model, curricula, runs = _workdir.load(
      f"{workdir}/seed_{seed}", int(seed), config)
  held, fit = runs.group(curricula, "held_out"), runs.group(curricula, "fit")
  held_ids, fit_ids = np.asarray(held.batch_ids), np.asarray(fit.batch_ids)
  if (held_ids < 0).any() or (fit_ids < 0).any():
    raise ValueError("this script assumes curricula without padding slots")
  actual, fit_losses = np.asarray(held.losses), np.asarray(fit.losses)
  num_held, steps, _ = held_ids.shape
  ks = [int(k) for k in str(ks).split(",")]
  starts = int(num_starts)
  linear = simulators.fit("linear", fit, l2=10.0)
  lin = _linear_rollout(linear, held_ids, actual[:, 0], 0, steps)  # [H, T+1, M]
  blind = evaluation.all_steps_mse(
      evaluation.curriculum_blind(fit_losses, num_held), actual)

  def report(name, pred, cost):
    rho = evaluation.spearman_across_runs(pred, actual)
    mse = evaluation.all_steps_mse(pred, actual)
    return (f"  {name:<28} ρ across runs {rho:.3f}, all_steps_mse {mse:.3f} "
            f"({mse / blind:.2f}× blind), {cost:.1f} run-equivalents")

  lines = [f"{config_path} seed {seed}: {num_held} held-out runs, T={steps}, "
           f"{fit_ids.shape[0]} fitted runs, starts J={starts}",
           report("simfluence_linear", lin, fit_ids.shape[0])]
  # Every spliced run of every k, trained at once: [K, J, H, T, B].
  spliced = np.stack([np.stack([np.concatenate(
      [np.broadcast_to(fit_ids[j, :steps - k], (num_held, steps - k, fit_ids.shape[2])),
       held_ids[:, steps - k:]], 1) for j in range(starts)]) for k in ks])
  start = time.perf_counter()
  trained = training.train_runs(
      model.params, spliced.reshape((-1,) + held_ids.shape[1:]),
      loss_fn=model.loss_fn, config=config, train_arrays=dataset.train,
      test_arrays=dataset.test, seed=config.seed, progress=False)
  seconds = time.perf_counter() - start
  losses = np.asarray(trained.trace.losses).reshape(
      spliced.shape[:3] + actual.shape[1:])  # [K, J, H, T+1, M]
  for i, k in enumerate(ks):
    cut = steps - k
    restart = lin.copy()
    restart[:, cut:] = losses[i, :, :, cut:].mean(0)
    corrected = lin.copy()
    own = _linear_rollout(linear, held_ids, lin[:, cut], cut, steps)
    shift = np.stack([own - _linear_rollout(
        linear, held_ids, np.broadcast_to(fit_losses[j, cut], lin[:, cut].shape),
        cut, steps) for j in range(starts)])  # [J, H, k+1, M]
    corrected[:, cut:] = (losses[i, :, :, cut:] + shift).mean(0)
    cost = fit_ids.shape[0] + num_held * starts * k / steps
    lines.append(report(f"k={k} restart", restart, cost))
    lines.append(report(f"k={k} restart+linear", corrected, cost))
  lines.append(f"  ({spliced.shape[0] * starts * num_held} spliced runs trained in "
               f"{seconds:.0f} s)")
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
