r"""Why every method's across-run ρ collapses in `configs/default.py:rough`.

  python experiments/rough_regime.py WORKDIR SEED [CONFIG]

Reads a finished main job (`WORKDIR/seed_<SEED>` of `CONFIG`, default
`configs/default.py:rough`; nothing is retrained) and prints, on its held-out runs:

1. *Recency:* ρ across runs between L_{T−k} and L_T. A low value at small k means
   the last steps move each test loss a lot, differently in every curriculum.
2. *One-step predictability:* Simfluence-Linear (l2 10) fitted on the job's fitted
   runs, fed the actual L_t of the held-out runs: the R² across runs of its predicted
   step changes L_{t+1} − L_t (steps T/2..T), and ρ of the final loss when it rolls
   out only the last k steps from the actual L_{T−k}.
3. *Rank ensembles:* ρ of the mean across-run rank of several methods' saved
   predictions (`evaluation/pred_*.npy`).
4. *More state:* per test example, a ridge fit of L_{t+1} on the batch's example
   counts c (B), c·L_t (A, Simfluence-Linear) and, added, c·mean_m L_t (the whole
   test set's loss, a proxy of the parameters) or c·t/T (phase-dependent effects),
   rolled out from L_0. The grid's best l2 is shown, chosen on the held-out runs
   themselves (optimistic).
5. *State and curvature with more runs* (hypotheses 7 and 8; only where
   `experiments/rollout_fit.py` has cached `extra_runs_192.npz` for the seed): the
   same ridge with, added, a drift of each test loss on the whole vector L_t and a
   constant ("coupled", M + 1 numbers per test example, shared by all curricula) or
   c·L_t² ("quadratic"), fitted on the 48 fitted runs and on those plus the 192
   extra ones.

The numbers are in docs/experiments.md ("The rough regime: ...").
"""

import os
import sys

import numpy as np

from simfluence_jax import config_lib
from simfluence_jax import evaluation
from simfluence_jax import simulators
from simfluence_jax.trace import Trace

sys.path.insert(0, "experiments")
import _workdir  # pylint: disable=g-import-not-at-top

ENSEMBLES = (("simfluence_linear", "tracin_cp"),
             ("simfluence_linear", "ekfac_if"),
             ("simfluence_linear", "simfluence_featurized", "tracin_cp", "ekfac_if"),
             ("simfluence_linear", "simfluence_featurized", "simfluence_additive",
              "tracin_cp", "tracin_per_step", "ekfac_if", "metagradient"))


def _final(actual, final_losses):
  """A [R, T+1, M] prediction whose last step is `final_losses` (all ρ reads)."""
  pred = np.array(actual, copy=True)
  pred[:, -1] = final_losses
  return pred


def _counts(batch_ids, num_train):
  """float[R, T, N]: each example's occurrences in each step's batch, / B."""
  runs, steps, batch = batch_ids.shape
  counts = np.zeros((runs, steps, num_train))
  r, t = np.meshgrid(np.arange(runs), np.arange(steps), indexing="ij")
  np.add.at(counts, (r[..., None], t[..., None], batch_ids), 1.0 / batch)
  return counts


def _features(counts, losses, start, num_steps, extra):
  """float[R, S, M, F] for steps start.. of counts [R, S, N], losses L_t [R, S, M]."""
  shape = losses.shape + (counts.shape[-1],)
  c = counts[:, :, None, :]
  parts = [c * losses[..., None], np.broadcast_to(c, shape)]
  if extra == "mean loss":
    parts.append(np.broadcast_to(c * losses.mean(-1)[..., None, None], shape))
  if extra == "phase":
    phase = (start + np.arange(losses.shape[1])) / num_steps
    parts.append(np.broadcast_to(c * phase[None, :, None, None], shape))
  if extra == "quadratic":
    # An example's effect that curves with the test loss it meets (c·L_t²).
    parts.append(c * losses[..., None] ** 2)
  if extra == "coupled":
    # A drift in every test example's loss, shared by all curricula: each test
    # loss L_m moves with the whole vector L_t (M numbers) and a constant.
    state = np.concatenate([losses, np.ones(losses.shape[:-1] + (1,))], -1)
    parts.append(np.broadcast_to(state[:, :, None, :], losses.shape + state.shape[-1:]))
  return np.concatenate(parts, -1)


def _state_model(fit, held, num_train, extra, l2_grid=(0.01, 0.1, 1.0)):
  """(best ρ, its l2) of the ridge simulator with `extra` state, rolled out."""
  fit_losses, actual = np.asarray(fit.losses), np.asarray(held.losses)
  fit_counts = _counts(np.asarray(fit.batch_ids), num_train)
  held_counts = _counts(np.asarray(held.batch_ids), num_train)
  steps = fit_losses.shape[1] - 1
  x = _features(fit_counts, fit_losses[:, :-1], 0, steps, extra)
  y = fit_losses[:, 1:]
  best = (-np.inf, None)
  for l2 in l2_grid:
    w = np.stack([np.linalg.solve(
        xm.T @ xm + l2 * np.eye(xm.shape[1]), xm.T @ ym) for xm, ym in
                  ((x[:, :, m].reshape(-1, x.shape[-1]), y[:, :, m].ravel())
                   for m in range(y.shape[-1]))])
    loss = actual[:, 0]
    for t in range(steps):
      feats = _features(held_counts[:, t:t + 1], loss[:, None], t, steps, extra)
      loss = np.einsum("rmf,mf->rm", feats[:, 0], w)
    rho = evaluation.spearman_across_runs(_final(actual, loss), actual)
    best = max(best, (rho, l2))
  return best


def main(workdir, seed, config_path="configs/default.py:rough"):
  config = config_lib.load_config(config_path)
  config.seed = int(seed)
  _, _, _, _, curricula, runs = _workdir.load(f"{workdir}/seed_{seed}", int(seed),
                                              config)
  held, fit = runs.group(curricula, "held_out"), runs.group(curricula, "fit")
  actual = np.asarray(held.losses)  # [R, T+1, M]
  steps = actual.shape[1] - 1
  lines = [f"{config_path} seed {seed}:"]
  recency = {k: evaluation.spearman_across_runs(_final(actual, actual[:, -1 - k]),
                                                actual) for k in (1, 2, 4, 8, 16)}
  lines.append("  1. ρ(L_{T-k}, L_T): " + ", ".join(
      f"k={k} {v:.3f}" for k, v in recency.items()))

  linear = simulators.fit("linear", fit, l2=10.0)
  ids = np.asarray(held.batch_ids)
  alpha = np.asarray(linear.A)[ids].sum(2)  # [R, T, M]
  beta = np.asarray(linear.B)[ids].sum(2)
  change = actual[:, 1:] - actual[:, :-1]
  predicted = (alpha - 1.0) * actual[:, :-1] + beta
  late = slice(steps // 2, steps)
  residual = ((change - predicted)[:, late] ** 2).sum()
  total = ((change - change.mean(0))[:, late] ** 2).sum()
  rollouts = {}
  for k in (1, 2, 4, 8, steps):
    loss = actual[:, -1 - k]
    for t in range(steps - k, steps):
      loss = alpha[:, t] * loss + beta[:, t]
    rollouts[k] = evaluation.spearman_across_runs(_final(actual, loss), actual)
  lines.append(f"  2. Simfluence-Linear fed the actual L_t: step-change R² "
               f"{1 - residual / total:.3f} (steps {steps // 2}..{steps}); ρ rolling "
               f"out the last k steps: " + ", ".join(
                   f"k={k} {v:.3f}" for k, v in rollouts.items()))

  saved = {name: np.load(f"{workdir}/seed_{seed}/evaluation/pred_{name}.npy")
           for name in ENSEMBLES[-1]}
  ranks = {name: np.argsort(np.argsort(p[:, -1], 0), 0).astype(float)
           for name, p in saved.items()}
  alone = {name: evaluation.spearman_across_runs(p, actual) for name, p in saved.items()}
  lines.append("  3. alone: " + ", ".join(f"{n} {v:.3f}" for n, v in alone.items()))
  for names in ENSEMBLES:
    rho = evaluation.spearman_across_runs(
        _final(actual, sum(ranks[n] for n in names)), actual)
    lines.append(f"     rank mean of {' + '.join(names)}: {rho:.3f}")

  num_train = config.num_train_examples
  for extra in ("none", "mean loss", "phase"):
    rho, l2 = _state_model(fit, held, num_train, extra)
    lines.append(f"  4. ridge simulator, state L_t{'' if extra == 'none' else ' + ' + extra}: "
                 f"ρ {rho:.3f} (l2 {l2})")
  extra_path = f"{workdir}/seed_{seed}/extra_runs_192.npz"
  if os.path.exists(extra_path):
    more = np.load(extra_path)
    pools = {"48": fit, "240": Trace(
        batch_ids=np.concatenate([fit.batch_ids, more["batch_ids"]]),
        losses=np.concatenate([fit.losses, more["losses"]]),
        learning_rates=np.concatenate([fit.learning_rates, more["learning_rates"]]),
        num_train_examples=num_train)}
    for name, pool in pools.items():
      for extra in ("none", "coupled", "quadratic"):
        rho, l2 = _state_model(pool, held, num_train, extra, (0.01, 0.1, 1.0, 10.0))
        lines.append(f"  5. {name} fitted runs, state L_t"
                     f"{'' if extra == 'none' else ' + ' + extra}: " + (
                         f"ρ {rho:.3f} (l2 {l2})" if l2 is not None else
                         "the rollout diverges at every l2"))
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
