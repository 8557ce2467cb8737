"""Training-run simulators: Simfluence-Linear / -Additive / featurized, scores as simulators.

Public API:
  fit(kind, trace, l2=1e-3, *, prior_alpha=None, prior_A=None, prior_B=None,
      features=None, base="linear", intercept=True, num_phases=1, method="auto", ...)
      -> Simulator;  kind in FIT_KINDS = ("linear", "additive", "featurized").
  fit_cv(kind, trace, l2_grid=DEFAULT_L2_GRID, *, num_folds=5,
         metric="all_steps_mse", **fit_kwargs) -> Simulator: l2 by K-fold
      cross-validation with runs as folds (fit_info["cv"]).
  additive_from_scores(B, name, *, batch_size=None, num_steps=None,
      fitted_ids=None) -> Simulator
  tracin_per_step(trace, name) -> Simulator
  Simulator: .kind, .A, .B, .batch_size, .num_steps, .fitted_ids, .simulate(batch_ids,
    initial_losses, weights=None, *, allow_extrapolation=False,
    allow_nonfinite=False, allow_unfitted_ids=False), .simulate_with_bands(...),
    .fit_info, .save(path) / Simulator.load(path).
  solve(...): the sparse, column-vectorised (and column-sharded) ridge solver.
  search_curriculum(sim, initial_losses, start_batch_ids, targets) -> SearchResult:
    curricula minimising the simulated final loss of target test examples.

A simulator fitted per id on recorded runs (Linear / Additive without per-example
prior centres, per-step TracIn) records the ids those runs contained
(`fitted_ids`): for any other id it has only its prior, so `simulate` and
`search_curriculum` refuse such ids unless `allow_unfitted_ids=True`. With phases
the coverage is per phase (`phase_fitted_ids`; `fitted_ids`: the ids of every
phase), and each step's ids are checked against its phase.
"""

from simfluence_jax.simulators._fit import additive_from_scores
from simfluence_jax.simulators._fit import CV_METRICS
from simfluence_jax.simulators._fit import DEFAULT_L2_GRID
from simfluence_jax.simulators._fit import fit
from simfluence_jax.simulators._fit import FIT_KINDS
from simfluence_jax.simulators._fit import fit_cv
from simfluence_jax.simulators._fit import fitted_ids_of
from simfluence_jax.simulators._fit import tracin_per_step
from simfluence_jax.simulators._search import search_curriculum
from simfluence_jax.simulators._search import SearchResult
from simfluence_jax.simulators._search import target_weights
from simfluence_jax.simulators._simulator import KINDS
from simfluence_jax.simulators._simulator import Posterior
from simfluence_jax.simulators._simulator import Simulator
from simfluence_jax.simulators._solver import METHODS
from simfluence_jax.simulators._solver import solve

__all__ = ["CV_METRICS", "DEFAULT_L2_GRID", "FIT_KINDS", "KINDS", "METHODS", "Posterior",
           "SearchResult", "Simulator", "additive_from_scores", "fit", "fit_cv", "fitted_ids_of",
           "search_curriculum", "solve", "target_weights", "tracin_per_step"]
