"""Evaluation of simulators on held-out runs, and the report writer.

Public API: all_steps_mse, final_step_mse, spearman, spearman_across_runs, lds,
removal_lds, curriculum_blind, undefined_reasons, spearman_across_runs_skipped,
evaluate(simulator, held_out_trace), write_report(workdir, ...), METRICS,
write_training_metrics / write_evaluation_metrics (TensorBoard event files).
"""

from simfluence_jax.evaluation._metrics import compute_metrics
from simfluence_jax.evaluation._metrics import METRICS
from simfluence_jax.evaluation._metrics import all_steps_mse
from simfluence_jax.evaluation._metrics import curriculum_blind
from simfluence_jax.evaluation._metrics import evaluate
from simfluence_jax.evaluation._metrics import final_step_mse
from simfluence_jax.evaluation._metrics import lds
from simfluence_jax.evaluation._metrics import MIN_RUNS_FOR_RHO
from simfluence_jax.evaluation._metrics import min_loss
from simfluence_jax.evaluation._metrics import rankdata
from simfluence_jax.evaluation._metrics import removal_lds
from simfluence_jax.evaluation._metrics import spearman
from simfluence_jax.evaluation._metrics import spearman_across_runs
from simfluence_jax.evaluation._metrics import spearman_across_runs_skipped
from simfluence_jax.evaluation._metrics import undefined_reasons
from simfluence_jax.evaluation._report import write_report
from simfluence_jax.evaluation._writers import write_evaluation_metrics
from simfluence_jax.evaluation._writers import write_training_metrics

__all__ = ["METRICS", "MIN_RUNS_FOR_RHO", "all_steps_mse", "compute_metrics",
           "curriculum_blind", "evaluate", "final_step_mse", "lds", "min_loss",
           "rankdata", "removal_lds", "spearman", "spearman_across_runs",
           "spearman_across_runs_skipped", "undefined_reasons",
           "write_evaluation_metrics", "write_report", "write_training_metrics"]
