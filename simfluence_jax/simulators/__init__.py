"""Training-run simulators: Simfluence-Linear / -Additive, and scores as simulators.

Public API:
  fit(kind, trace, l2=1e-3, *, prior_alpha=None, method="auto", ...) -> Simulator
  additive_from_scores(B, name) -> Simulator
  tracin_per_step(trace, name) -> Simulator
  Simulator: .kind, .A, .B, .simulate(...), .simulate_with_bands(...), .fit_info
  solve(...): the sparse, column-vectorised ridge solver used by `fit`.
  search_curriculum(sim, initial_losses, start_batch_ids, targets) -> SearchResult:
    curricula minimising the simulated final loss of target test examples.
  Simulator.save(path) / Simulator.load(path): atomic, pickle-free persistence.
"""

from simfluence_jax.simulators._fit import additive_from_scores
from simfluence_jax.simulators._fit import fit
from simfluence_jax.simulators._fit import tracin_per_step
from simfluence_jax.simulators._search import search_curriculum
from simfluence_jax.simulators._search import SearchResult
from simfluence_jax.simulators._search import target_weights
from simfluence_jax.simulators._simulator import KINDS
from simfluence_jax.simulators._simulator import Posterior
from simfluence_jax.simulators._simulator import Simulator
from simfluence_jax.simulators._solver import METHODS
from simfluence_jax.simulators._solver import solve

__all__ = ["KINDS", "METHODS", "Posterior", "SearchResult", "Simulator",
           "additive_from_scores", "fit", "search_curriculum", "solve", "target_weights",
           "tracin_per_step"]
