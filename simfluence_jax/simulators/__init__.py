"""Training-run simulators: Simfluence-Linear / -Additive, and scores as simulators.

Public API:
  fit(kind, trace, l2=1e-3, *, prior_alpha=None, method="auto", ...) -> Simulator
  additive_from_scores(B, name) -> Simulator
  tracin_per_step(trace, name) -> Simulator
  Simulator: .kind, .A, .B, .simulate(...), .simulate_with_bands(...), .fit_info
  solve(...): the sparse, column-vectorised ridge solver used by `fit`.
"""

from simfluence_jax.simulators._fit import additive_from_scores
from simfluence_jax.simulators._fit import fit
from simfluence_jax.simulators._fit import tracin_per_step
from simfluence_jax.simulators._simulator import KINDS
from simfluence_jax.simulators._simulator import Posterior
from simfluence_jax.simulators._simulator import Simulator
from simfluence_jax.simulators._solver import METHODS
from simfluence_jax.simulators._solver import solve

__all__ = ["KINDS", "METHODS", "Posterior", "Simulator", "additive_from_scores", "fit",
           "solve", "tracin_per_step"]
