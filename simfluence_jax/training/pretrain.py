"""Brief pre-training of the base model that every run starts from."""

import logging
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from simfluence_jax import _checks
from simfluence_jax.training import step as step_lib

_logger = logging.getLogger(__name__)


def pretrain_base(params: Any, loss_fn: step_lib.LossFn, arrays: Dict[str, Any], *,
                  num_steps: int, batch_size: int, learning_rate: float = 1e-3,
                  seed: int = 0) -> Any:
  """Adam on minibatches of `arrays` (reshuffled every epoch), one jitted scan.

  Args:
    params: initial variables `{"params": ...}`.
    loss_fn: per-example loss `(params, batch) -> float32[n]`.
    arrays: dict of arrays with a leading example axis (e.g. `dataset.pretrain`).
    num_steps: number of Adam steps (0 returns `params` unchanged).
    batch_size: examples per step (at most the number of examples).
    learning_rate: constant Adam learning rate.
    seed: seed of the example order.

  Returns:
    The pre-trained variables, same structure as `params`.

  Raises:
    ValueError: what `train_runs` refuses in its arrays (leading sizes that
      differ, class ids or negative LM input ids the loss would misread), or a
      batch_size < 1.
  """
  if num_steps <= 0:
    return params
  from simfluence_jax.training import runs as runs_lib  # pylint: disable=g-import-not-at-top
  runs_lib.check_arrays("pretrain_base", loss_fn, params, arrays, arrays)
  if not _checks.is_int(batch_size) or batch_size < 1:
    raise ValueError(f"pretrain_base: batch_size must be a positive integer, got "
                     f"{batch_size!r}.")
  num_examples = jax.tree_util.tree_leaves(arrays)[0].shape[0]
  batch_size = min(batch_size, num_examples)
  batches_per_epoch = num_examples // batch_size
  num_epochs = -(-num_steps // batches_per_epoch)
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(num_examples)[:batches_per_epoch * batch_size]
                          for _ in range(num_epochs)])
  batch_ids = order[:num_steps * batch_size].reshape(num_steps, batch_size)
  optimizer = optax.adam(learning_rate)

  @jax.jit
  def run(params, arrays, batch_ids):
    def body(carry, ids):
      params, opt_state = carry
      batch = jax.tree_util.tree_map(lambda x: jnp.take(x, ids, axis=0), arrays)
      loss, grads = jax.value_and_grad(lambda p: jnp.mean(
          step_lib.trainable_only(loss_fn)(p, batch)))(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), step_losses = jax.lax.scan(
        body, (params, optimizer.init(params)), batch_ids)
    return params, step_losses

  params, step_losses = run(params, arrays, jnp.asarray(batch_ids, jnp.int32))
  step_losses = np.asarray(step_losses)
  bad = _checks.first_nonfinite(step_losses)
  if bad is not None:
    raise FloatingPointError(f"pretrain_base: non-finite loss at step {bad[0]}.")
  _logger.info("pretrain_base: %d steps, loss %.4f -> %.4f (mean of first/last 10).",
               num_steps, float(step_losses[:10].mean()), float(step_losses[-10:].mean()))
  return params
