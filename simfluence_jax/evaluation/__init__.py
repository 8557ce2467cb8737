"""Evaluation of simulators on held-out runs, and the report writer.

Public API: all_steps_mse, final_step_mse, spearman, spearman_across_runs, lds,
evaluate(simulator, held_out_trace), write_report(workdir, ...), METRICS.
"""

from simfluence_jax.evaluation._metrics import compute_metrics
from simfluence_jax.evaluation._metrics import METRICS
from simfluence_jax.evaluation._metrics import all_steps_mse
from simfluence_jax.evaluation._metrics import evaluate
from simfluence_jax.evaluation._metrics import final_step_mse
from simfluence_jax.evaluation._metrics import lds
from simfluence_jax.evaluation._metrics import spearman
from simfluence_jax.evaluation._metrics import spearman_across_runs
from simfluence_jax.evaluation._report import write_report

__all__ = ["METRICS", "all_steps_mse", "compute_metrics", "evaluate", "final_step_mse",
           "lds", "spearman", "spearman_across_runs", "write_report"]
