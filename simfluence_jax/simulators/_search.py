"""Curriculum search on a fitted simulator: which curriculum would teach the targets best?

A curriculum here has the shape of the training curricula (`data.make_curricula`): a
subset of S train examples visited in some order, one or more times. The search keeps
that shape (same S, T, B and padding, so it competes fairly with random curricula of the
same size) and changes two things:

* *membership* (keep / drop): replace every occurrence of the subset's j-th example by
  an example of the pool that is not in the subset;
* *order*: swap the examples at two non-padding positions of the same epoch (only
  proposed for simulators where order matters, i.e. Simfluence-Linear), so every
  example is still seen once per epoch.

Each iteration draws `num_proposals` random moves, simulates all of them at once
(`vmap` of the autoregressive rollout), and keeps the best if it lowers the objective:
the weighted final simulated loss of the target test examples. Restarts from several
starting curricula run together (`vmap` over candidates); the whole loop is one
`lax.scan` inside one `jit`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _checks
from simfluence_jax.simulators import _simulator


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """What `search_curriculum` found.

  Attributes:
    batch_ids: int32[C, T, B] the best curriculum of every restart (-1 = padding).
    objective: float32[C] its simulated objective (weighted final target loss, with
      the search's `loss_floor` clipping).
    initial_objective: float32[C] the objective of the starting curricula.
    history: float32[C, num_iters + 1] the objective after every iteration.
    target_weights: float32[M] the normalised weights of the objective.
  """

  batch_ids: np.ndarray
  objective: np.ndarray
  initial_objective: np.ndarray
  history: np.ndarray
  target_weights: np.ndarray

  @property
  def best(self) -> int:
    """Index of the restart with the lowest simulated objective."""
    return int(np.argmin(self.objective))


def target_weights(targets: Union[Sequence[int], np.ndarray], num_test: int
                   ) -> np.ndarray:
  """float32[M] weights summing to 1 from test indices int[k] or weights float[M].

  Raises:
    ValueError: empty targets, indices out of [0, M) or repeated, or weights of the
      wrong shape, negative or all zero.
  """
  targets = np.asarray(targets)
  if targets.size == 0:
    raise ValueError("targets: empty; give test example indices or weights [M].")
  if np.issubdtype(targets.dtype, np.integer):
    if targets.ndim != 1 or targets.min() < 0 or targets.max() >= num_test:
      raise ValueError(f"targets: indices must be a 1-D list in [0, {num_test}), got "
                       f"{targets.tolist()}.")
    values, counts = np.unique(targets, return_counts=True)
    if (counts > 1).any():
      raise ValueError(f"targets: repeats test example {int(values[counts > 1][0])}; "
                       "give each index once (or float weights [M]).")
    weights = np.zeros(num_test, np.float32)
    weights[targets] = 1.0
  else:
    if targets.shape != (num_test,) or not np.all(np.isfinite(targets)):
      raise ValueError(f"targets: float weights must be finite with shape ({num_test},),"
                       f" got shape {targets.shape}.")
    if targets.min() < 0 or targets.sum() <= 0:
      raise ValueError("targets: weights must be non-negative and not all zero.")
    weights = targets.astype(np.float32)
  return weights / weights.sum()


def reorders(simulator: _simulator.Simulator,
             batch_ids: Optional[np.ndarray] = None) -> bool:
  """Whether `search_curriculum` proposes order swaps by default: where the order
  matters (linear simulators, those with phases, and a `batch_mean` simulator on
  start curricula `batch_ids` int[C, T, B] with padded steps: an id's effect there
  is divided by its step's valid ids, so which step holds it changes the loss)."""
  padded = (batch_ids is not None and simulator.batch_mean
            and bool(np.any(np.asarray(batch_ids) < 0)))
  return simulator.kind == "linear" or simulator.num_phases > 1 or padded


def check_epochs(batch_ids: np.ndarray, epoch_steps: Optional[int],
                 who: str = "start_batch_ids") -> None:
  """Refuses start curricula int[C, T, B] that are not one pass over their ids per
  epoch of `epoch_steps` steps (None: the whole curriculum is one epoch).

  Order swaps stay within a declared epoch, so a start whose real epochs differ
  from the declared ones would come back holding an id twice in one real epoch,
  even in one batch (a curriculum `data.make_curricula` never draws). Every
  declared epoch must hold no id twice, and every full one (all but a shorter last
  one) each of the curriculum's ids once. (Checked where the search reorders;
  membership moves alone replace every occurrence of an id, keeping each epoch's
  structure.)

  Raises:
    ValueError: naming `who`, the curriculum, the id or epoch, and `epoch_steps`.
  """
  batch_ids = np.asarray(batch_ids)
  num_steps = batch_ids.shape[1]
  length = num_steps if epoch_steps is None else epoch_steps
  fix = ("pass the curricula's epoch length (steps per pass over their ids) as "
         "epoch_steps.")
  for c, ids in enumerate(batch_ids):
    distinct = np.unique(ids[ids >= 0]).size
    for first in range(0, num_steps, length):
      last = min(first + length, num_steps) - 1
      epoch = (f"the whole curriculum (epoch_steps=None: one epoch of {num_steps} "
               "steps)" if epoch_steps is None else
               f"the epoch of epoch_steps={epoch_steps} at steps {first}-{last}")
      chunk = ids[first:last + 1]
      values, counts = np.unique(chunk[chunk >= 0], return_counts=True)
      if (counts > 1).any():
        raise ValueError(f"{who}: curriculum {c} repeats id "
                         f"{int(values[counts > 1][0])} within {epoch}: {fix}")
      if last + 1 - first == length and values.size != distinct:
        raise ValueError(f"{who}: curriculum {c} holds {values.size} of its "
                         f"{distinct} ids in {epoch}, not each once: {fix}")


def _split_curricula(batch_ids: np.ndarray):
  """(subsets int32[C, S], schedule int32[C, T, B] indexing into the subset or -1)."""
  subsets, schedules = [], []
  for c, ids in enumerate(batch_ids):
    subset, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.reshape(ids.shape)
    if subset.size and subset[0] == -1:
      subset, inverse = subset[1:], inverse - 1
    if subsets and subset.size != subsets[0].size:
      raise ValueError(f"start_batch_ids: every starting curriculum must use the same "
                       f"number of distinct examples; curriculum 0 uses "
                       f"{subsets[0].size}, curriculum {c} uses {subset.size}.")
    if subset.size == 0:
      raise ValueError(f"start_batch_ids: curriculum {c} is all padding.")
    subsets.append(subset)
    schedules.append(np.where(ids >= 0, inverse, -1))
  return (np.stack(subsets).astype(np.int32), np.stack(schedules).astype(np.int32))


@functools.partial(jax.jit, static_argnames=("linear", "batch_mean", "num_iters",
                                             "num_proposals",
                                             "reorder", "epoch_steps", "floor",
                                             "floor_each_step"))
def _search(a, b, phases, loss0, weights, subsets, schedules, pool, key, *, linear,
            batch_mean,
            num_iters, num_proposals, reorder, epoch_steps, floor, floor_each_step):
  """Jitted local search, vmapped over restarts; see `search_curriculum`.

  a, b: float32[P, N, M'] per-phase parameters; phases: int32[T].
  """
  pool_size = pool.shape[0]

  def objective(subset, schedule):
    ids = jnp.where(schedule >= 0, subset[jnp.maximum(schedule, 0)], -1)
    return weights @ _simulator.final_losses(a, b, ids, loss0, linear=linear,
                                             batch_mean=batch_mean,
                                             phases=phases, floor=floor,
                                             floor_each_step=floor_each_step)

  def one_restart(subset, schedule, key):
    num_slots = subset.shape[0]
    flat_valid = (schedule.reshape(-1) >= 0).astype(jnp.float32)
    position_p = flat_valid / flat_valid.sum()
    num_steps, batch_size = schedule.shape
    epoch = jnp.arange(num_steps * batch_size) // (batch_size * epoch_steps)

    def propose(subset, schedule, key):
      key_kind, key_slot, key_new, key_p, key_q = jax.random.split(key, 5)
      # Membership move: slot j takes pool example u (invalid if u is already in).
      slot = jax.random.randint(key_slot, (), 0, num_slots)
      new_id = pool[jax.random.randint(key_new, (), 0, pool_size)]
      swapped_in = subset.at[slot].set(new_id)
      duplicate = jnp.any(subset == new_id)
      # Order move: swap the examples at two non-padding positions.
      p = jax.random.choice(key_p, schedule.size, p=position_p)
      same_epoch = flat_valid * (epoch == epoch[p])
      q = jax.random.choice(key_q, schedule.size, p=same_epoch / same_epoch.sum())
      flat = schedule.reshape(-1)
      reordered = flat.at[p].set(flat[q]).at[q].set(flat[p]).reshape(schedule.shape)
      is_order = reorder & (jax.random.uniform(key_kind) < 0.5)
      new_subset = jnp.where(is_order, subset, swapped_in)
      new_schedule = jnp.where(is_order, reordered, schedule)
      value = objective(new_subset, new_schedule)
      value = jnp.where(~is_order & duplicate, jnp.inf, value)
      return new_subset, new_schedule, value

    def iteration(carry, key):
      subset, schedule, value = carry
      keys = jax.random.split(key, num_proposals)
      subsets, schedules, values = jax.vmap(propose, in_axes=(None, None, 0))(
          subset, schedule, keys)
      best = jnp.argmin(values)
      better = values[best] < value
      subset = jnp.where(better, subsets[best], subset)
      schedule = jnp.where(better, schedules[best], schedule)
      value = jnp.where(better, values[best], value)
      return (subset, schedule, value), value

    start = objective(subset, schedule)
    (subset, schedule, value), history = jax.lax.scan(
        iteration, (subset, schedule, start), jax.random.split(key, num_iters))
    ids = jnp.where(schedule >= 0, subset[jnp.maximum(schedule, 0)], -1)
    return ids, value, start, jnp.concatenate([start[None], history])

  keys = jax.random.split(key, subsets.shape[0])
  return jax.vmap(one_restart)(subsets, schedules, keys)


def _check_reordered_phases(simulator, start, epoch_steps: int) -> None:
  """Refuses start ids that an order swap could move into a phase that never saw
  them: a swap moves an id to any step of its epoch, so each id must have been
  fitted in every phase its epoch's steps span (`Simulator.phase_fitted_ids`)."""
  num_steps = start.shape[1]
  spread = []  # every step holds all ids of its epoch: where a swap can put them
  for first in range(0, num_steps, epoch_steps):
    epoch = start[:, first:first + epoch_steps]
    ids = epoch.reshape(len(start), 1, -1)
    spread.append(np.repeat(ids, epoch.shape[1], axis=1))
  width = max(part.shape[2] for part in spread)
  spread = np.concatenate([np.pad(part, ((0, 0), (0, 0), (0, width - part.shape[2])),
                                  constant_values=-1) for part in spread], axis=1)
  simulator.check_fitted_ids(spread, who="start_batch_ids (order swaps move ids "
                             "within their epoch)", caller="search_curriculum")


def search_curriculum(simulator: _simulator.Simulator, initial_losses: Any,
                      start_batch_ids: Any, targets: Union[Sequence[int], np.ndarray],
                      *, pool: Optional[Sequence[int]] = None, num_iters: int = 300,
                      num_proposals: int = 64, reorder: Optional[bool] = None,
                      epoch_steps: Optional[int] = None,
                      loss_floor: Optional[float] = 0.0,
                      seed: int = 0,
                      allow_extrapolation: bool = False,
                      allow_unfitted_ids: bool = False) -> SearchResult:
  """Searches for curricula minimising the simulated final loss of target examples.

  Args:
    simulator: a fitted `Simulator` (N train examples, M test examples).
    initial_losses: float32[M] test losses before the first step (the base model's).
    start_batch_ids: int32[C, T, B] starting curricula, one per restart (e.g. random
      ones from `data.make_curricula`); all must use the same number S of distinct
      examples. The result keeps their shape, S and padding.
    targets: test example indices int[k] (equal weights) or weights float32[M].
    pool: train ids the search may bring in (default: the simulator's
      `fitted_ids` where it records them and `allow_unfitted_ids` is False, else
      all N). Ids outside `fitted_ids` are refused in `start_batch_ids` and `pool`
      unless `allow_unfitted_ids`.
    num_iters: iterations of the local search.
    num_proposals: random moves simulated (in parallel) per iteration.
    reorder: propose order swaps too; default: where the order matters
      (`reorders`: linear simulators, those with phases, and a `batch_mean`
      simulator on starts with padded steps; otherwise a one-phase additive
      simulator's final loss does not depend on the order).
    epoch_steps: steps per epoch of `start_batch_ids`; order swaps stay within an
      epoch (default: the whole curriculum is one epoch). Where the search
      reorders, every epoch of a start must hold each of its ids once (a shorter
      last epoch: at most once), as `data.make_curricula` draws them; refused
      otherwise, naming epoch_steps (`check_epochs`).
    loss_floor: during the search every simulated step's loss is clipped at this
      value (default 0: no loss goes below zero), so the search cannot exploit a
      simulator's extrapolation to impossible losses (a final-only simulator: the
      final loss alone, its intermediate steps are not predictions); None: no
      clipping.
    seed: seed of the random moves.
    allow_extrapolation: allow curricula longer than the simulator's fitted number
      of steps (as in `Simulator.simulate`).
    allow_unfitted_ids: search with ids no fitted run contained, for which a
      per-id simulator has only its prior (as in `Simulator.simulate`).

  Returns:
    A `SearchResult`; `result.batch_ids[result.best]` is the best curriculum found.

  Raises:
    ValueError: naming the bad argument (shapes, ids out of range, a batch width or
      length the simulator was not fitted on, bad targets, targets the simulator has
      no finite parameters for, starts whose epochs are not those of `epoch_steps`).
  """
  num_train, num_test = simulator.num_train_examples, simulator.num_test_examples
  start = np.asarray(start_batch_ids)
  if start.ndim == 2:
    start = start[None]
  start = simulator.check_curricula(start, allow_extrapolation=allow_extrapolation,
                                    who="start_batch_ids")
  if not allow_unfitted_ids:
    simulator.check_fitted_ids(start, who="start_batch_ids",
                               caller="search_curriculum")
    if pool is None and simulator.fitted_ids is not None:
      pool = simulator.fitted_ids
    elif pool is not None:
      simulator.check_fitted_ids(np.asarray(pool), who="pool",
                                 caller="search_curriculum")
  initial_losses = np.asarray(initial_losses, np.float32)
  if initial_losses.shape != (num_test,) or not np.all(np.isfinite(initial_losses)):
    raise ValueError(f"initial_losses: expected finite float32[{num_test}], got shape "
                     f"{initial_losses.shape}.")
  simulator.check_initial_losses(initial_losses)
  weights = target_weights(targets, num_test)
  pool = np.arange(num_train) if pool is None else np.unique(np.asarray(pool))
  if pool.size == 0 or not np.issubdtype(pool.dtype, np.integer) or (
      pool.min() < 0 or pool.max() >= num_train):
    raise ValueError(f"pool: expected train ids in [0, {num_train}).")
  for name, value in (("num_iters", num_iters), ("num_proposals", num_proposals),
                      ("epoch_steps", 1 if epoch_steps is None else epoch_steps)):
    if not _checks.is_int(value) or value < 1:
      raise ValueError(f"{name}={value!r}: must be a positive integer.")
  num_iters, num_proposals = int(num_iters), int(num_proposals)
  epoch_steps = None if epoch_steps is None else int(epoch_steps)
  subsets, schedules = _split_curricula(start)
  linear = simulator.kind == "linear"
  reorder = reorders(simulator, start) if reorder is None else bool(reorder)
  # Only the target columns matter: simulate those alone.
  columns = np.flatnonzero(weights > 0)
  a, b = simulator.phase_parameters()
  a, b = a[:, :, columns], b[:, :, columns]
  unknown = columns[~np.all(np.isfinite(np.asarray(b)), axis=(0, 1))]
  if unknown.size:
    raise ValueError(f"targets: simulator {simulator.name!r} has no finite parameters "
                     f"for test examples {unknown.tolist()} (e.g. a table computed for "
                     "other test examples).")
  if reorder:  # Membership moves alone keep every epoch's ids as they are.
    check_epochs(start, epoch_steps)
  epoch_steps = start.shape[1] if epoch_steps is None else epoch_steps
  if reorder and not allow_unfitted_ids and simulator.phase_fitted_ids is not None:
    _check_reordered_phases(simulator, start, epoch_steps)
  phases = jnp.asarray(simulator.phase_of_steps(start.shape[1]))
  ids, value, start_value, history = _search(
      a, b, phases, jnp.asarray(initial_losses[columns]), jnp.asarray(weights[columns]),
      jnp.asarray(subsets), jnp.asarray(schedules), jnp.asarray(pool, jnp.int32),
      jax.random.key(seed), linear=linear, batch_mean=simulator.batch_mean,
      num_iters=num_iters,
      num_proposals=num_proposals, reorder=reorder, epoch_steps=epoch_steps,
      floor=None if loss_floor is None else float(loss_floor),
      floor_each_step=not simulator.final_only)
  return SearchResult(batch_ids=np.asarray(ids, np.int32),
                      objective=np.asarray(value, np.float32),
                      initial_objective=np.asarray(start_value, np.float32),
                      history=np.asarray(history, np.float32),
                      target_weights=weights)
