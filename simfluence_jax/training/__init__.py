"""Multi-run training producing traces.

`train_runs` trains R runs (one curriculum each, optionally with per-occurrence loss
weights) from the same base params together (vmap over runs, scan over steps, runs
sharded over a "runs" mesh axis) and returns their `Trace` plus the TracIn
checkpoints; `pretrain_base` and `save_params`/`load_params` produce and persist
that base model (the main job keeps it as its fingerprinted `base_model` stage). `metagradients` differentiates the final test
losses with respect to the occurrence weights (reverse mode through the run) and
`first_order_losses` expands a reference run's loss trajectory to first order in
the per-example weights (forward mode); `first_order_final_losses` gives its final
step by forward mode or from one reverse-mode table, whichever costs less.

Params convention: `params` is always the flax variables dict `{"params": ...}` that
`model.apply` takes directly.
"""

from simfluence_jax.training import checkpoints
from simfluence_jax.training import fingerprint
from simfluence_jax.training import metagradients as metagradients_lib
from simfluence_jax.training import optim
from simfluence_jax.training import pretrain
from simfluence_jax.training import runs
from simfluence_jax.training import step
from simfluence_jax.training.checkpoints import load_params
from simfluence_jax.training.checkpoints import load_tracin_checkpoints
from simfluence_jax.training.checkpoints import load_tracin_params
from simfluence_jax.training.checkpoints import save_params
from simfluence_jax.training.checkpoints import tracin_steps
from simfluence_jax.training.metagradients import FirstOrderFinalLosses
from simfluence_jax.training.metagradients import FirstOrderLosses
from simfluence_jax.training.metagradients import SingularExpansionError
from simfluence_jax.training.metagradients import derivative_growth
from simfluence_jax.training.metagradients import first_order_final_losses
from simfluence_jax.training.metagradients import first_order_losses
from simfluence_jax.training.metagradients import metagradients
from simfluence_jax.training.metagradients import predict_from_table
from simfluence_jax.training.metagradients import table_simulator
from simfluence_jax.training.optim import LEARNING_RATE_MEANING
from simfluence_jax.training.optim import make_optimizer
from simfluence_jax.training.optim import make_schedule
from simfluence_jax.training.pretrain import pretrain_base
from simfluence_jax.training.runs import TrainResult
from simfluence_jax.training.runs import Segment
from simfluence_jax.training.runs import make_segment_fn
from simfluence_jax.training.runs import runs_shardings
from simfluence_jax.training.runs import segment_program
from simfluence_jax.training.runs import state_shardings
from simfluence_jax.training.runs import train_runs
from simfluence_jax.training.step import dropout_key
from simfluence_jax.training.step import effective_weights
from simfluence_jax.training.step import gather_batch
from simfluence_jax.training.step import make_loss_fn
from simfluence_jax.training.step import make_train_step
from simfluence_jax.training.step import make_update
from simfluence_jax.training.step import projection_key

__all__ = [
    "FirstOrderFinalLosses", "FirstOrderLosses", "LEARNING_RATE_MEANING", "Segment",
    "SingularExpansionError", "TrainResult",
    "derivative_growth", "dropout_key", "effective_weights", "first_order_final_losses",
    "first_order_losses", "gather_batch",
    "load_params", "load_tracin_checkpoints", "load_tracin_params", "make_loss_fn",
    "make_segment_fn", "make_update", "metagradients", "predict_from_table",
    "table_simulator",
    "make_optimizer", "make_schedule", "make_train_step", "pretrain_base",
    "projection_key", "runs_shardings", "save_params", "segment_program",
    "state_shardings", "tracin_steps", "train_runs",
    "checkpoints", "fingerprint", "metagradients_lib", "optim", "pretrain", "runs",
    "step",
]
