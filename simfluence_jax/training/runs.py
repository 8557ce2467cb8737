"""R training runs trained together: vmap over runs, scan over steps, one jit.

Every run starts from the same base params and differs only in its curriculum
(`batch_ids[r]`). A segment of steps is one jitted call: `lax.scan` over the steps,
`vmap` over the runs of the pure `train_step` (on a CPU, many large runs that
record no gradients in vmapped groups of `CPU_RUNS_PER_GROUP`, one group after
another, which keeps a group in cache; `make_segment_fn`). The run axis is sharded over the
devices of a `Mesh` axis named "runs" when R divides evenly, so the same code runs
on one CPU or on every chip of a pod. Between segments the host copies the
recorded losses into the trace buffers, checks them, logs progress and writes
orbax checkpoints (layout in `checkpoints.py`); calling `train_runs` again with the
same workdir resumes from the latest checkpoint and gives identical results.
"""

import dataclasses
import functools
import json
import logging
import math
import sys
import time
import warnings
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from simfluence_jax import _checks
from simfluence_jax import _closures
from simfluence_jax import _io
from simfluence_jax import losses
from simfluence_jax import sharding as sharding_lib
from simfluence_jax import trace as trace_lib
from simfluence_jax.training import checkpoints
from simfluence_jax.training import fingerprint as fingerprint_lib
from simfluence_jax.training import optim
from simfluence_jax.training import step as step_lib

RUNS_AXIS = sharding_lib.RUNS_AXIS
# The resume fingerprint of a workdir (also in every checkpoint's meta/).
JOB_FILE = "train_runs_job.json"
# The job-file field of a custom loss's computation (`fingerprint.loss_computation`).
LOSS_COMPUTATION = "loss_computation"
# Job-file fields added after workdirs were first written: a workdir whose job file
# (or checkpoint meta) lacks one was written before it and is compared without it.
# `checkpoint_every`: resumed with another spacing, the TracIn checkpoints of one
# workdir would mix two spacings (0, 8, 16 then 20, 24, 28).
_ADDED_LATER = (LOSS_COMPUTATION, "checkpoint_every")

_logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
  """What `train_runs` produced.

  Attributes:
    trace: the recorded `Trace` (losses [R, T'+1, M], learning_rates [R, T'], and
      train_grads/test_grads when recorded), T' = the steps trained so far.
    params: final params of every run, numpy leaves [R, ...].
    train_losses: float32[R, T'], mean loss of each step's batch before its update.
    checkpoint_steps: steps [0, k, 2k, ..., T] whose params are TracIn checkpoints
      (k = checkpoint_every, or T when it is None); only those reached so far.
    workdir: where the checkpoints live, or None (then they are kept in memory).
    checkpoint_params: when workdir is None, numpy leaves [K, R, ...] aligned with
      `checkpoint_steps`; None otherwise (use `tracin_checkpoints()`).
    resumed_step: the step this call resumed from (the workdir's latest
      checkpoint), 0 when it trained from the start: this call trained
      T' − resumed_step steps.
  """

  trace: trace_lib.Trace
  params: Any
  train_losses: np.ndarray
  checkpoint_steps: List[int]
  workdir: Optional[str] = None
  checkpoint_params: Any = None
  resumed_step: int = 0

  def tracin_checkpoints(self) -> Tuple[List[int], Any]:
    """(steps, params with leaves [K, R, ...]), from memory or from the workdir."""
    if self.checkpoint_params is not None:
      return list(self.checkpoint_steps), self.checkpoint_params
    return checkpoints.load_tracin_checkpoints(self.workdir)


def runs_shardings(num_runs: int, mesh: Optional[jax.sharding.Mesh] = None
                   ) -> Tuple[jax.sharding.NamedSharding, jax.sharding.NamedSharding]:
  """(sharding of arrays with a leading run axis, replicated sharding).

  The run axis is split over the mesh's `runs` axis (default mesh: every device of
  the job on `runs`, `sharding.make_mesh(runs=None)`) when `num_runs` divides evenly
  by its size; otherwise every device holds all runs (logged).
  """
  if mesh is None:
    mesh = sharding_lib.runs_mesh()
  if not isinstance(mesh, jax.sharding.Mesh) or RUNS_AXIS not in mesh.axis_names:
    raise ValueError(f"mesh must be a jax.sharding.Mesh with a {RUNS_AXIS!r} axis "
                     f"(sharding.make_mesh), got {mesh!r}.")
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  size = mesh.shape[RUNS_AXIS]
  if num_runs % size == 0:
    return jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(RUNS_AXIS)), replicated
  _logger.warning("train_runs: R=%d runs do not divide evenly over %d run slots; "
                  "replicating the runs on every slot instead of sharding them.",
                  num_runs, size)
  return replicated, replicated


def state_shardings(tree: Any, run_sharding: jax.sharding.NamedSharding) -> Any:
  """Shardings of run-batched state (params, optimizer state; leaves [R, ...]).

  The run axis is placed as `run_sharding` places it (`runs_shardings`); the other
  dimensions follow `sharding.param_spec` over the mesh's `model` axis, so with
  `model` > 1 each run's parameters and optimizer moments are split over that many
  devices (FSDP-style) and XLA gathers each weight where the step uses it.
  """
  spec = tuple(run_sharding.spec)
  return sharding_lib.param_shardings(tree, run_sharding.mesh,
                                      leading=(spec[0] if spec else None,))


# Runs per vmapped group on a CPU backend (`train_runs(runs_per_group=None)`). The
# default model's segment took 14.5 s for 88 runs × 8 steps all vmapped at once, 11.8
# s in groups of 8, 10.9 s of 4 and 10.6 s of 2 (2-core CPU; docs/experiments.md):
# a small group's params and activations stay in cache. Accelerators vmap every run
# at once, which keeps their matmuls large.
CPU_RUNS_PER_GROUP = 2
# ... when a device's runs hold at least this many bytes of params: the default job's
# 80 runs (43 MB) gained 1.38× and its removal runs (33 then, 18 MB; 65 now) 1.2×, while the tiny
# job's runs (about 1 MB) gained nothing and lost 6 s compiled at -O0 (the tests).
CPU_GROUP_MIN_BYTES = 8 << 20


def default_runs_per_group(params: Any, num_runs: int,
                           platform: Optional[str] = None) -> Optional[int]:
  """`CPU_RUNS_PER_GROUP` on a CPU backend when `num_runs` runs of `params` (one
  run's, any pytree of arrays or shapes) reach `CPU_GROUP_MIN_BYTES`; None (all runs
  at once) otherwise. `platform`: the devices' (default: jax's default backend; the
  TPU plan passes its target's)."""
  bytes_per_run = sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
                      for x in jax.tree_util.tree_leaves(params))
  large = bytes_per_run * num_runs >= CPU_GROUP_MIN_BYTES
  platform = platform or jax.default_backend()
  return CPU_RUNS_PER_GROUP if large and platform == "cpu" else None


def runs_per_group_for(params: Any, num_runs: int,
                       run_sharding: jax.sharding.NamedSharding, record_grads: bool,
                       platform: Optional[str] = None) -> Optional[int]:
  """The grouping `train_runs(runs_per_group=None)` trains `num_runs` runs of
  `params` (one run's arrays or shapes) placed by `run_sharding` with: runs that
  record gradients all at once (in groups of 2 the default job's 8 recording runs
  took 84 s instead of 40, likely because each group draws the random projection of
  the recorded gradients again; vmapped, all runs share one draw per step), the
  others `default_runs_per_group` of each device's runs. The TPU plan asks it for
  its target's `platform`, so it compiles the program the job runs."""
  if record_grads:
    return None
  return default_runs_per_group(params, num_runs // _runs_axis_size(run_sharding),
                                platform=platform)


def _runs_axis_size(run_sharding: jax.sharding.NamedSharding) -> int:
  """Devices the run axis is split over (1 when every device holds every run)."""
  spec = tuple(run_sharding.spec)
  return run_sharding.mesh.shape[RUNS_AXIS] if spec and spec[0] == RUNS_AXIS else 1


def make_segment_fn(train_step, run_sharding, shardings=None,
                    runs_per_group: Optional[int] = None):
  """Jitted segment of S steps of R runs.

  Args:
    train_step: the single-run step of `step.make_train_step`.
    run_sharding: sharding of arrays with a leading run axis (`runs_shardings`).
    shardings: (params shardings, opt_state shardings) pytrees the updated state
      keeps (`state_shardings`); None = `run_sharding` for every leaf.
    runs_per_group: G: each device trains its runs G at a time (vmapped), one
      group after another (`lax.map`), each group all S steps; None = all of its
      runs at once. The runs are independent, so G changes float rounding only.
      Ignored (all at once) when the mesh splits a run's params over `model`.

  Returns:
    `segment(params, opt_state, first_step, batch_ids, train_arrays, test_arrays,
    weights=None, hyperparameters=None) -> (params, opt_state, (test_losses,
    extras))` with params/opt_state leaves [R, ...] (donated), batch_ids
    int32[R, S, B], weights float32[R, S, B] (None = ones), test_losses
    float32[R, S, M] and extras leaves [R, S, ...]. Run r of the segment is run
    index r of a stochastic loss's keys. `hyperparameters` (any pytree, the same
    for every run; e.g. `optim.split_settings`'s numbers) is passed to every
    `train_step` call as a last argument when given: values a step takes as
    arguments rather than compiled-in constants.
  """
  def bind(hyperparameters):
    if hyperparameters is None:
      return train_step
    return lambda *args: train_step(*args, hyperparameters)

  devices = _runs_axis_size(run_sharding)
  if run_sharding.mesh.shape.get(sharding_lib.MODEL_AXIS, 1) > 1:
    runs_per_group = None

  def all_at_once(params, opt_state, first_step, batch_ids, weights, runs,
                  train_arrays, test_arrays, hyperparameters):
    vmapped_step = jax.vmap(bind(hyperparameters),
                            in_axes=(0, 0, None, 0, None, 0, 0, 0))

    def body(carry, xs):
      params, opt_state, step = carry
      batch_ids_t, weights_t = xs
      params, opt_state, test_losses, extras = vmapped_step(
          params, opt_state, step, batch_ids_t, train_arrays, test_arrays,
          weights_t, runs)
      return (params, opt_state, step + 1), (test_losses, extras)

    (params, opt_state, _), outputs = jax.lax.scan(
        body, (params, opt_state, first_step),
        (jnp.swapaxes(batch_ids, 0, 1), jnp.swapaxes(weights, 0, 1)))
    # Back to run-major [R, S, ...] so the outputs stay sharded over runs.
    outputs = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), outputs)
    return params, opt_state, outputs

  def in_groups(params, opt_state, first_step, batch_ids, weights, runs,
                train_arrays, test_arrays, hyperparameters):
    one_step = bind(hyperparameters)

    def one_run(xs):
      params, opt_state, ids, run_weights, run, test = xs

      def body(carry, step_xs):
        params, opt_state, step = carry
        params, opt_state, test_losses, extras = one_step(
            params, opt_state, step, step_xs[0], train_arrays, test, step_xs[1],
            run)
        return (params, opt_state, step + 1), (test_losses, extras)

      (params, opt_state, _), outputs = jax.lax.scan(
          body, (params, opt_state, first_step), (ids, run_weights))
      return params, opt_state, outputs

    xs = (params, opt_state, batch_ids, weights, runs, test_arrays)
    if devices == 1:
      return jax.lax.map(one_run, xs, batch_size=runs_per_group)
    # [R, ...] -> [D, R/D, ...]: the leading axis is the one split over devices
    # (vmapped, so partitioned), and each device maps over its own runs.
    split = lambda x: jnp.reshape(x, (devices, -1) + x.shape[1:])
    merged = jax.vmap(lambda local: jax.lax.map(one_run, local,
                                                batch_size=runs_per_group))(
                                                    jax.tree_util.tree_map(split, xs))
    return jax.tree_util.tree_map(lambda x: jnp.reshape(x, (-1,) + x.shape[2:]),
                                  merged)

  def segment(params, opt_state, first_step, batch_ids, train_arrays, test_arrays,
              weights=None, hyperparameters=None):
    num_runs = batch_ids.shape[0]
    if weights is None:
      weights = jnp.ones(batch_ids.shape, jnp.float32)
    # The test examples are batched over runs like the params: JAX's batching rule
    # of a grouped convolution (the weight gradient of a per-example conv gradient)
    # raises NotImplementedError when only the kernel is batched and the arrays
    # carry a mesh sharding.
    test_arrays = broadcast_over_runs(test_arrays, num_runs)
    runs = jnp.arange(num_runs, dtype=jnp.int32)
    grouped = runs_per_group is not None and runs_per_group < num_runs // devices
    return (in_groups if grouped else all_at_once)(
        params, opt_state, first_step, batch_ids, weights, runs, train_arrays,
        test_arrays, hyperparameters)

  out_shardings = run_sharding if shardings is None else (*shardings, run_sharding)
  return jax.jit(segment, donate_argnums=(0, 1), out_shardings=out_shardings)


@functools.lru_cache(maxsize=16)
def _segment_fn(loss_fn, structure, record_grads, projection_dim, seed,
                grad_chunk_size, run_sharding, state_treedef, state_leaves,
                runs_per_group):
  """The jitted segment of `train_runs`, cached: a call with the same loss function,
  optimizer structure (`optim.split_settings`: its numbers, the learning rates
  among them, are the segment's `hyperparameters` argument), recording, seed
  (projection and dropout keys), shardings and grouping reuses the compiled
  program instead of tracing and compiling it again (the shapes of its arguments
  are jax.jit's own cache key)."""

  def train_step(params, opt_state, step, batch_ids_t, train_arrays, test_arrays,
                 weights_t, run, hyperparameters):
    optimizer, schedule = optim.joined_optimizer(structure, hyperparameters)
    return step_lib.make_train_step(
        loss_fn, optimizer, schedule, record_grads=record_grads,
        projection_dim=projection_dim, key=step_lib.projection_key(seed),
        grad_chunk_size=grad_chunk_size, rng_key=step_lib.dropout_key(seed))(
            params, opt_state, step, batch_ids_t, train_arrays, test_arrays,
            weights_t, run)

  return make_segment_fn(train_step, run_sharding,
                         jax.tree_util.tree_unflatten(state_treedef, state_leaves),
                         runs_per_group=runs_per_group)


class Segment(NamedTuple):
  """`train_runs`' compiled training segment and what it is called with.

  Attributes:
    fn: the jitted segment of `make_segment_fn`, `fn(params, opt_state,
      first_step, batch_ids, train_arrays, test_arrays, weights, hyperparameters)`.
    hyperparameters: its last argument, the optimizer's numbers
      (`optim.split_settings`; float32 scalars).
    init: `params [R, ...] -> opt_state [R, ...]`, the optimizer's state (vmapped).
    params_sharding: the runs' params layout (`state_shardings`).
    opt_sharding: the optimizer state's layout.
  """

  fn: Any
  hyperparameters: Dict[str, np.float32]
  init: Any
  params_sharding: Any
  opt_sharding: Any


def segment_program(loss_fn: step_lib.LossFn, optimizer_config: Any, num_steps: int,
                    run_params: Any, run_sharding: jax.sharding.NamedSharding, *,
                    record_grads: bool = False, projection_dim: int = 0,
                    seed: int = 0, grad_chunk_size: Optional[int] = None,
                    runs_per_group: Optional[int] = None,
                    who: str = "train_runs") -> Segment:
  """The segment `train_runs` trains `run_params` with, and its layouts: the one
  place it is built, so the TPU plan (`planning.stages`) compiles this very
  program. `run_params` leaves [R, ...] (arrays or shapes); the optimizer settings
  are read once (`checked_split_settings`): the cached program (`_segment_fn`) is
  keyed on their structure and takes their numbers as `hyperparameters`."""
  structure, hyperparameters = checked_split_settings(who, optimizer_config,
                                                      num_steps)
  optimizer, _ = optim.joined_optimizer(structure, hyperparameters)
  params_sharding = state_shardings(run_params, run_sharding)
  init = jax.vmap(optimizer.init)
  opt_sharding = state_shardings(jax.eval_shape(init, run_params), run_sharding)
  leaves, treedef = jax.tree_util.tree_flatten((params_sharding, opt_sharding))
  fn = _segment_fn(loss_fn, structure, bool(record_grads), int(projection_dim),
                   int(seed), grad_chunk_size, run_sharding, treedef, tuple(leaves),
                   runs_per_group)
  return Segment(fn, hyperparameters, init, params_sharding, opt_sharding)


def broadcast_over_runs(arrays: Any, num_runs: int) -> Any:
  """Leaves [n, ...] -> [R, n, ...] (inside a jit: no copy until XLA needs one)."""
  return jax.tree_util.tree_map(
      lambda x: jnp.broadcast_to(x, (num_runs,) + x.shape), arrays)


def _segment_end(step: int, stop: int, num_steps: int,
                 checkpoint_every: Optional[int],
                 steps_per_segment: int) -> int:
  """Next segment boundary: absolute multiples, so resumed runs segment alike."""
  ends = [stop, (step // steps_per_segment + 1) * steps_per_segment]
  if checkpoint_every:
    ends.append((step // checkpoint_every + 1) * checkpoint_every)
  return min(min(ends), num_steps)


def _check_finite(name: str, values: np.ndarray, first_step: int) -> None:
  """Raises FloatingPointError naming the first run and step of a non-finite value."""
  bad = ~np.isfinite(values)
  if bad.any():
    run, offset = (int(i) for i in np.argwhere(bad.reshape(bad.shape[:2] + (-1,))
                                               .any(-1))[0])
    raise FloatingPointError(
        f"train_runs: non-finite {name} in run {run} at step {first_step + offset} "
        f"(batch_ids[{run}, {first_step + offset}]); stopping. Checkpoints written "
        "before this segment are kept.")


def _leaf_name(path) -> str:
  """"labels" for the path of `arrays["labels"]`; "a/b" for nested containers."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts) or "(the array)"


def _leading_size(who: str, arrays: Any, argument: str, axis: str) -> int:
  """The number of examples of `arrays` (N or M): every leaf's leading size, which
  must be one and the same (ValueError naming each leaf's otherwise)."""
  leaves = jax.tree_util.tree_flatten_with_path(arrays)[0]
  if not leaves:
    raise ValueError(f"{who}: {argument} has no arrays.")
  sizes = [(_leaf_name(path), int(np.shape(x)[0]) if np.ndim(x) else None)
           for path, x in leaves]
  if None in {size for _, size in sizes} or len({size for _, size in sizes}) != 1:
    got = ", ".join(f"{name} {'(a scalar)' if size is None else size}"
                    for name, size in sizes)
    raise ValueError(f"{who}: {argument}: every array needs the same leading axis "
                     f"{axis}, got {got}.")
  return sizes[0][1]


def _check_class_ids(who: str, loss_fn: step_lib.LossFn, params: Any,
                     arrays: Any, argument: str) -> None:
  """Refuses class ids the loss would read wrongly: for `step.make_loss_fn`'s
  losses (`loss_fn.class_ids_key`: classification "labels", LM "targets";
  `loss_fn.num_classes(params, inputs)`: C, the logits' last dimension) every id
  that counts must be in [0, C), padding in [-C, C) (`losses.misread_class_ids`:
  LM targets count where the mask is > 0, so padding under mask 0 may hold -1, or
  -100 when C > 100). For the LM loss, integer `inputs` token ids must be ≥ 0
  everywhere (`_check_input_ids`). Another loss's arrays are its own
  business (e.g. labels -100 that it masks): nothing is checked."""
  key = getattr(loss_fn, "class_ids_key", None)
  if not key or not isinstance(arrays, Mapping) or key not in arrays or (
      "inputs" not in arrays):
    return
  ids = np.asarray(sharding_lib.to_host(arrays[key]))
  if not np.issubdtype(ids.dtype, np.integer) or not ids.size:
    return
  counts = np.ones(ids.shape, bool)
  if "mask" in arrays and np.shape(arrays["mask"]) == ids.shape:
    counts = np.asarray(sharding_lib.to_host(arrays["mask"])) > 0
  num_classes = loss_fn.num_classes(params, arrays["inputs"])
  counted_bad, padding_bad = losses.misread_class_ids(ids, num_classes, counts)
  bad = counted_bad | padding_bad
  if not bad.any():
    if key == "targets":
      _check_input_ids(who, arrays["inputs"], argument)
    return
  index, where = _first_bad(bad)
  masked = counts.ndim and not counts.all()
  if padding_bad[index]:
    raise ValueError(f'{who}: {argument}["{key}"] must be in [-{num_classes}, '
                     f"{num_classes}) even where the mask is 0 (outside, the loss "
                     f"reads NaN), got {ids[index]} at {where}.")
  raise ValueError(f'{who}: {argument}["{key}"] must be in [0, {num_classes})'
                   + (" where the mask is > 0" if masked else "")
                   + f", got {ids[index]} at {where}.")


def _first_bad(bad: np.ndarray) -> Tuple[Tuple[int, ...], str]:
  """(index, "row r (index [r, c])") of the first True of `bad`, in C order."""
  index = tuple(int(i) for i in np.argwhere(bad)[0])
  return index, f"row {index[0]}" + (f" (index {list(index)})" if len(index) > 1
                                     else "")


def _check_input_ids(who: str, inputs: Any, argument: str) -> None:
  """Refuses negative integer LM input token ids, masked or not: the embedding
  lookup wraps a negative id to row V + id (a silent wrong loss). Ids ≥ the output
  vocabulary are left alone: a model may embed more input tokens than it predicts
  (e.g. a BOS), and the built-in Transformer reads NaN there, which training
  refuses. Inputs that are not an integer array (features, a pytree) are the
  model's own business."""
  if not hasattr(inputs, "dtype") or not np.issubdtype(inputs.dtype, np.integer):
    return
  ids = np.asarray(sharding_lib.to_host(inputs))
  bad = ids < 0
  if not ids.size or not bad.any():
    return
  index, where = _first_bad(bad)
  raise ValueError(f'{who}: {argument}["inputs"] must be ≥ 0 (token ids; the '
                   f"embedding would wrap a negative one), got {ids[index]} at "
                   f"{where}.")


def _check_params0(who: str, params0: Any) -> None:
  """Refuses params0 that training cannot differentiate as given (review h36; each
  failed deep inside jax or flax): an `nnx.Module`, an `nnx.State` holding
  variables other than `nnx.Param` (its BatchStat was trained), and integer or
  bool leaves (`jax.grad` takes float leaves only). A linen variables dict's state
  collections (batch_stats, ...) are held fixed (`step.trainable_only`)."""
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None and isinstance(params0, nnx.Module):
    raise ValueError(f"{who}: params0 is an nnx.Module; pass nnx.state(module, "
                     f"nnx.Param) and merge the module inside loss_fn.")
  if nnx is not None and isinstance(params0, nnx.State):
    others = sorted({type(v).__name__ for v in jax.tree_util.tree_leaves(
        params0, is_leaf=lambda x: isinstance(x, nnx.Variable))
                     if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param)})
    if others:
      raise ValueError(
          f"{who}: params0 is an nnx.State holding {others} variables besides "
          f"nnx.Param, and every leaf of params0 is trained; pass nnx.state(module, "
          f"nnx.Param) and merge the rest inside loss_fn.")
  for path, leaf in jax.tree_util.tree_flatten_with_path(params0)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):  # bfloat16 too
      raise ValueError(
          f"{who}: params0{jax.tree_util.keystr(path)} has dtype {dtype}, and "
          f"training differentiates every leaf of params0 (float only); close over "
          f"such arrays in loss_fn.")


def check_float32_params(who: str, params0: Any) -> None:
  """Refuses params0 with float leaves narrower than float32 where a derivative of
  training is asked for: each update is rounded to the leaf's dtype (bfloat16 drops
  updates under half a step: 44-46% of a small MLP's weights never moved at SGD lr
  2e-3), which no derivative sees (review h39: metagradients 33-117% off
  retraining the bf16 run). Train float32 master weights (the model's compute
  dtype may still be bfloat16)."""
  narrow = _narrow_floats(params0, skip=step_lib.STATE_COLLECTIONS)
  if narrow:
    path, dtype = narrow[0]
    raise ValueError(
        f"{who}: params0{jax.tree_util.keystr(path)} is {dtype}: training rounds "
        f"each update to {dtype} (updates under half a step are lost), which no "
        f"derivative sees; differentiate float32 master weights (params0 in "
        f"float32; the model may still compute in {dtype}).")


def _narrow_floats(params0: Any, skip=()) -> list:
  """(path, dtype) of params0's float leaves narrower than float32, leaving out the
  top-level collections in `skip` (held fixed in training: review h40)."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params0)[0]:
    dtype = jnp.result_type(leaf)
    if path and getattr(path[0], "key", None) in skip:
      continue
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
      found.append((path, dtype))
  return found


def check_arrays(who: str, loss_fn: step_lib.LossFn, params0: Any,
                 train_arrays: Any, test_arrays: Any) -> Tuple[int, int]:
  """(N, M) of `train_arrays` / `test_arrays`, checked before anything is computed.

  Every array of each needs the same leading axis (N, resp. M), and the class ids
  of `step.make_loss_fn`'s losses must be in [0, C) where they count
  (`_check_class_ids`). ValueError naming the array otherwise.
  """
  _check_params0(who, params0)
  num_train = _leading_size(who, train_arrays, "train_arrays", "N")
  num_test = _leading_size(who, test_arrays, "test_arrays", "M")
  _check_loss_fn(who, loss_fn, params0, train_arrays, test_arrays)
  _check_class_ids(who, loss_fn, params0, train_arrays, "train_arrays")
  _check_class_ids(who, loss_fn, params0, test_arrays, "test_arrays")
  return num_train, num_test


def _check_loss_fn(who: str, loss_fn: step_lib.LossFn, params0: Any,
                   train_arrays: Any, test_arrays: Any) -> None:
  """Traces `loss_fn` on params0 and one example of each of the arrays (a failure
  is one line naming them, not a traceback from inside the model), and refuses a
  loss function that now computes something other than at its first call with
  these shapes (`_closures.check_unchanged`: a value it closes over changed, and
  JAX's trace of the function, keyed by it, still holds the old one; review h38:
  stale losses, metagradients 11× off). Skipped while nothing the loss reads
  changed since the last traces (`_closures.memoized`)."""
  # On the params' shapes alone: a weakly typed param and its trained value trace
  # alike, placements aside.
  shapes = _closures.abstract(params0)
  examples = (_closures.one_example(train_arrays), _closures.one_example(test_arrays))
  takes_rng = step_lib.takes_rng(loss_fn)
  _closures.memoized(
      loss_fn, (_checks.tree_signature(shapes),) + tuple(
          _checks.tree_signature(x) for x in examples) + (takes_rng,), loss_fn,
      functools.partial(_trace_loss_fn, who, loss_fn, shapes, examples, takes_rng))


def _trace_loss_fn(who, loss_fn, shapes, examples, takes_rng) -> None:
  """`_check_loss_fn`'s traces (skipped while nothing the loss reads changed:
  `_closures.memoized`)."""
  # Training draws a key per example (the default PRNG's raw key shape); the test
  # losses are evaluated without one (review h40).
  key = jax.ShapeDtypeStruct(_closures.raw_key_shape(), jnp.uint32)
  traces = []
  for example, argument, kwargs in (
      (examples[0], "train_arrays", {"rng": key} if takes_rng else {}),
      (examples[1], "test_arrays", {})):
    if traces and not kwargs and not traces[0][2] and (
        _checks.tree_signature(example) == _checks.tree_signature(traces[0][1])):
      break  # the same trace as the train example's, which succeeded
    try:
      traces.append((_closures.trace(loss_fn, shapes, example, **kwargs),
                     example, kwargs))
    except Exception as error:  # pylint: disable=broad-except  # the user's model
      raise ValueError(
          f"{who}: loss_fn fails on params0 and one example of {argument} "
          f"({_closures.error_line(error)}).") from error
  closed, example, _ = traces[0]
  _closures.check_unchanged(
      loss_fn, closed, (shapes, example),
      f"{who}: loss_fn computes something other than at its first call with these "
      f"shapes: a value it reads from outside its arguments changed (e.g. a "
      f"temperature or frozen weights it closes over, or a global), and JAX's trace "
      f"of it would still use the old one; pass a new function for the new value, "
      f"binding it (lambda p, b, t=temperature: ...).")


def checked_weights(who: str, weights: Any, batch_ids: np.ndarray,
                    name: str = "weights", ids_name: str = "batch_ids") -> np.ndarray:
  """Occurrence weights like `batch_ids` as float32 (ones when None), refusing
  another shape, a non-numeric dtype and NaN/inf (naming the first). Any finite
  sign is allowed: a negative weight ascends that example's loss (unlearning)."""
  if weights is None:
    return np.ones(batch_ids.shape, np.float32)
  weights = np.asarray(weights)
  if weights.shape != batch_ids.shape or not (
      np.issubdtype(weights.dtype, np.floating)
      or np.issubdtype(weights.dtype, np.integer)):
    raise ValueError(f"{who}: {name} must be float{list(batch_ids.shape)} like "
                     f"{ids_name}, got {weights.dtype}{list(weights.shape)}.")
  weights = weights.astype(np.float32)
  bad = _checks.first_nonfinite(weights)
  if bad is not None:
    raise ValueError(f"{who}: {name} must be finite; {name}{list(bad)} = "
                     f"{weights[bad]}.")
  return weights


def checked_split_settings(who: str, config: Any, num_steps: int
                           ) -> Tuple[tuple, Dict[str, np.float32]]:
  """`optim.split_settings`, refusing a learning rate that is not a finite positive
  number (as the command line does), a negative or non-finite end_learning_rate and
  the optimizer numbers `optim.optimizer_settings` refuses (momentum, b1, b2, eps,
  warmup_steps out of range): each trains something else than asked without a NaN
  to show it. Every message starts with `who`."""
  try:
    structure, hyperparameters = optim.split_settings(config, num_steps)
  except ValueError as e:  # an unknown optimizer, a number out of its range
    raise ValueError(f"{who}: {e}") from None
  rate = hyperparameters["learning_rate"]
  if not (np.isfinite(rate) and rate > 0):
    raise ValueError(f"{who}: config.learning_rate="
                     f"{float(optim.config_field(config, 'learning_rate'))!r}: must be "
                     "a finite positive number.")
  end = hyperparameters.get("end_learning_rate")
  if end is not None and not (np.isfinite(end) and end >= 0):
    raise ValueError(f"{who}: config.end_learning_rate="
                     f"{float(optim.config_field(config, 'end_learning_rate'))!r}: "
                     "must be a finite non-negative number.")
  return structure, hyperparameters


def train_runs(params0: Any, batch_ids: Any, *, loss_fn: step_lib.LossFn,
               train_arrays: Dict[str, Any], test_arrays: Dict[str, Any],
               optimizer_config: Any = None, config: Any = None,
               workdir: Optional[str] = None,
               checkpoint_every: Optional[int] = None, record_grads: bool = False,
               projection_dim: int = 32, seed: int = 0, progress: bool = True,
               max_steps: Optional[int] = None,
               steps_per_segment: Optional[int] = None,
               grad_chunk_size: Optional[int] = None,
               metadata: Optional[dict] = None,
               mesh: Optional[jax.sharding.Mesh] = None,
               weights: Any = None,
               runs_per_group: Optional[int] = None) -> TrainResult:
  """Trains R runs from the same base params, one curriculum each, and records them.

  Args:
    params0: base variables `{"params": ...}` (unbatched), shared by all runs.
    batch_ids: int32[R, T, B] train ids per run and step, -1 = padding.
    loss_fn: per-example loss `(params, batch) -> float32[n]` (`make_loss_fn`).
    train_arrays: dict of arrays, row i = train example i (N rows, every array).
      Integer "labels" (LM "targets" where the mask is > 0) must be in [0, C), C
      the logits' last dimension, for `make_loss_fn`'s losses; another loss's
      arrays are not checked (`check_arrays`).
    test_arrays: dict of arrays of the M test examples (checked alike).
    optimizer_config: config for `optim.make_optimizer` (`optimizer`,
      `learning_rate` > 0, `lr_schedule`, ...); the linear schedule decays over T
      (to `end_learning_rate` ≥ 0).
    config: alias of `optimizer_config` (e.g. the experiment config, whose
      top-level fields hold the optimizer settings); give exactly one.
    workdir: directory for resumable checkpoints (`runs_ckpt/`) and TracIn
      checkpoints (`tracin_ckpt/`); None keeps everything in memory. If it holds a
      checkpoint of the same job, training resumes from the latest one (the same
      job: optimizer settings, base params, data, curricula, weights, recording,
      seed and checkpoint_every; another is refused naming the changed fields).
    checkpoint_every: k; the state is checkpointed and the TracIn params are kept
      at steps 0, k, 2k, ..., T. None: only at 0 and T.
    record_grads: record projected per-example gradients (train and test) at the
      params before every step, for per-step TracIn.
    projection_dim: K of the recorded projections.
    seed: seed of the projection key (`step.projection_key(seed)`) and of a
      stochastic loss's per-slot keys (`step.dropout_key(seed)`, folded with the
      run index r in `batch_ids`, the step and the slot).
    progress: log a line per segment (step/T, mean train loss, steps/s, elapsed,
      ETA).
    max_steps: stop after this many steps in total (the returned trace covers
      them; with a workdir the state is saved there so a later call resumes).
    steps_per_segment: steps per jitted call (default: k, or about T/10); segment
      boundaries are multiples of it and of k, so results do not depend on where
      a run was interrupted.
    grad_chunk_size: per-example gradients computed this many at a time.
    metadata: extra JSON-serialisable entries for `trace.metadata`.
    mesh: mesh whose `runs` axis the runs are split over and whose `model` axis
      splits each run's params and optimizer state (`sharding.make_mesh`); None =
      every device of the job on `runs`. Results do not depend on it (up to float
      rounding of sharded sums).
    weights: float32[R, T, B] occurrence weights, each multiplying its example's
      loss in its step (None = ones, bit-for-bit the unweighted run). The step
      objective is Σ_b w_b·valid_b·ℓ_b / (number of valid slots): a weight-0 slot
      keeps its place in the denominator (MAGIC's convention; a removed example
      does not renormalise the batch), see `step.py`.
    runs_per_group: runs each device trains at a time, vmapped, one group after
      another (`make_segment_fn`); None = `default_runs_per_group()` (2 on a CPU
      backend when a device's runs hold ≥ `CPU_GROUP_MIN_BYTES` of params: 80
      default-model runs 1.38× faster on 2 cores; every run at once on accelerators,
      for smaller runs and when recording gradients). Results do not depend on it
      (up to float rounding).

  Resuming: a workdir is only resumed by a call with the same fingerprint
  (`JOB_FILE`): optimizer and all its hyperparameters, loss/model description,
  digests of params0, train/test arrays, batch_ids and weights, record_grads,
  projection_dim, seed and the sizes. Otherwise ValueError naming each differing
  field; the other job's checkpoints are kept untouched.

  Returns:
    A `TrainResult`. Learning rates are the schedule's value per step: the exact
    step size for SGD, the nominal rate for momentum/Adam
    (`optim.LEARNING_RATE_MEANING`, also in `trace.metadata`).

  Raises:
    FloatingPointError: a NaN/inf training or test loss (names run and step).
    ValueError: bad shapes or weights, arrays whose leading sizes differ, labels /
      targets out of range, a learning rate that is not a finite positive number,
      or a workdir holding a different job.
  """
  if (optimizer_config is None) == (config is None):
    raise ValueError("train_runs: give exactly one of optimizer_config and config.")
  optimizer_config = config if optimizer_config is None else optimizer_config
  batch_ids = np.asarray(batch_ids)
  if (batch_ids.ndim != 3 or not np.issubdtype(batch_ids.dtype, np.integer)
      or 0 in batch_ids.shape):
    raise ValueError(f"train_runs: batch_ids must be int[R, T, B] with R, T, B ≥ 1, "
                     f"got {batch_ids.dtype}{list(batch_ids.shape)}.")
  batch_ids = batch_ids.astype(np.int32)
  num_runs, num_steps, batch_size = batch_ids.shape
  num_train, num_test = check_arrays("train_runs", loss_fn, params0, train_arrays,
                                     test_arrays)
  narrow = sorted({str(dtype) for _, dtype in _narrow_floats(params0)})
  if narrow:  # review h39
    warnings.warn(f"train_runs: params0 has {narrow} leaves: each update is rounded "
                  f"to that dtype, and updates under half a step are lost (44-46% of "
                  f"a small MLP's weights never moved at SGD lr 2e-3); train float32 "
                  f"master weights for runs that follow float32 training.",
                  stacklevel=2)
  if batch_ids.min() < -1 or batch_ids.max() >= num_train:
    raise ValueError(f"train_runs: batch_ids must be in [-1, N={num_train}), found "
                     f"[{batch_ids.min()}, {batch_ids.max()}].")
  weights = checked_weights("train_runs", weights, batch_ids)
  for name, value in (("checkpoint_every", checkpoint_every),
                      ("steps_per_segment", steps_per_segment)):
    if value is not None and (not _checks.is_int(value) or value <= 0):
      raise ValueError(f"train_runs: {name} must be a positive integer, got "
                       f"{value!r}.")
  if grad_chunk_size is not None:
    try:
      step_lib._chunk_size(batch_ids.shape[2], grad_chunk_size)  # pylint: disable=protected-access
    except ValueError as e:
      raise ValueError(f"train_runs: {e}") from None
  stop = num_steps if max_steps is None else max(0, min(int(max_steps), num_steps))
  steps_per_segment = int(steps_per_segment or checkpoint_every
                          or max(1, -(-num_steps // 10)))
  tracin_every = checkpoint_every or num_steps
  tracin_due = lambda s: s % tracin_every == 0 or s == num_steps

  run_sharding, replicated = runs_shardings(num_runs, mesh)
  host_params0 = sharding_lib.to_host(params0)
  run_params = jax.tree_util.tree_map(
      lambda x: np.repeat(x[None], num_runs, axis=0), host_params0)
  if runs_per_group is None:
    runs_per_group = runs_per_group_for(host_params0, num_runs, run_sharding,
                                        record_grads)
  elif isinstance(runs_per_group, bool) or not isinstance(
      runs_per_group, (int, np.integer)) or runs_per_group < 1:
    raise ValueError(f"train_runs: runs_per_group must be a positive integer or "
                     f"None, got {runs_per_group!r}.")
  # The optimizer settings are read once: the segment is keyed on their structure
  # and takes their numbers.
  program = segment_program(loss_fn, optimizer_config, num_steps, run_params,
                            run_sharding, record_grads=record_grads,
                            projection_dim=projection_dim, seed=seed,
                            grad_chunk_size=grad_chunk_size,
                            runs_per_group=runs_per_group)
  segment, hyperparameters = program.fn, program.hyperparameters
  train_dev = sharding_lib.put(train_arrays, replicated)
  test_dev = sharding_lib.put(test_arrays, replicated)
  params = sharding_lib.put(run_params, program.params_sharding)
  opt_state = jax.jit(program.init, out_shardings=program.opt_sharding)(params)

  buffers = {
      "batch_ids": batch_ids,
      "losses": np.zeros((num_runs, num_steps + 1, num_test), np.float32),
      "learning_rates": np.zeros((num_runs, num_steps), np.float32),
      "train_losses": np.zeros((num_runs, num_steps), np.float32),
  }
  if record_grads:
    buffers["train_grads"] = np.zeros(
        (num_runs, num_steps, batch_size, projection_dim), np.float32)
    buffers["test_grads"] = np.zeros(
        (num_runs, num_steps, num_test, projection_dim), np.float32)
  initial_losses = sharding_lib.to_host(jax.jit(loss_fn)(
      sharding_lib.put(host_params0, replicated), test_dev))
  buffers["losses"][:, 0] = initial_losses[None]
  job = {"num_steps": num_steps, "num_runs": num_runs, "batch_size": batch_size,
         "num_test_examples": num_test, "record_grads": bool(record_grads),
         "projection_dim": int(projection_dim), "seed": int(seed),
         **fingerprint_lib.optimizer_fields(optimizer_config, num_steps),
         "loss": fingerprint_lib.digest(
             np.frombuffer(fingerprint_lib.loss_description(loss_fn).encode(),
                           np.uint8)),
         "params0": fingerprint_lib.digest(host_params0),
         "train_arrays": fingerprint_lib.digest(sharding_lib.to_host(train_arrays)),
         "test_arrays": fingerprint_lib.digest(sharding_lib.to_host(test_arrays)),
         "batch_ids": fingerprint_lib.digest(batch_ids),
         "weights": fingerprint_lib.digest(weights),
         "checkpoint_every": int(tracin_every)}
  if workdir is not None:
    # Names alone do not identify a loss: two closures of one factory (another
    # temperature) would resume each other's runs, and `make_loss_fn`'s description
    # shows a module's fields, not its code (relu edited to tanh resumed the relu
    # runs: review h36). Its traced computation does, training path included.
    job[LOSS_COMPUTATION] = fingerprint_lib.loss_computation(
        loss_fn, host_params0, sharding_lib.to_host(test_arrays),
        stochastic=step_lib.takes_rng(loss_fn))

  step = resumed_step = 0
  runs_manager = tracin_manager = None
  memory_checkpoints = {}
  if workdir is not None:
    _check_job_file(workdir, job)
    runs_manager = checkpoints.runs_manager(workdir)
    tracin_manager = checkpoints.tracin_manager(workdir)
    latest = runs_manager.latest_step()
    if latest is not None and latest > stop:
      # Resuming would return `latest` steps where `max_steps` asked for fewer.
      raise ValueError(f"train_runs: max_steps={max_steps}, but {workdir!r} already "
                       f"holds step {latest} of these runs; use another workdir, or "
                       f"max_steps >= {latest}.")
    if latest is not None:
      params, opt_state, buffers = _restore(runs_manager, latest, params, opt_state,
                                            buffers, job, workdir)
      step = resumed_step = latest
      _logger.info("train_runs: resumed %d runs from step %d/%d in %s.", num_runs,
                   step, num_steps, workdir)
    if 0 not in tracin_manager.all_steps():
      tracin_manager.save(0, args=ocp.args.StandardSave(params))
    if step and tracin_due(step) and step not in tracin_manager.all_steps():
      # Killed between the resumable checkpoint of `step` and its TracIn one: the
      # restored params are those of `step`, so the TracIn checkpoint is written now.
      tracin_manager.save(step, args=ocp.args.StandardSave(params))
  else:
    memory_checkpoints[0] = jax.tree_util.tree_map(
        lambda x: np.repeat(x[None], num_runs, axis=0), host_params0)

  try:
    first_segment, train_start = True, time.perf_counter()
    while step < stop:
      end = _segment_end(step, stop, num_steps, checkpoint_every, steps_per_segment)
      start_time = time.perf_counter()
      params, opt_state, outputs = segment(
          params, opt_state, jnp.int32(step),
          sharding_lib.put(batch_ids[:, step:end], run_sharding),
          train_dev, test_dev, sharding_lib.put(weights[:, step:end], run_sharding),
          hyperparameters)
      test_losses, extras = sharding_lib.to_host(outputs)
      elapsed = time.perf_counter() - start_time
      _check_finite("training loss", extras["train_loss"], step)
      _check_finite("test loss", test_losses, step)
      buffers["losses"][:, step + 1:end + 1] = test_losses
      buffers["learning_rates"][:, step:end] = extras["learning_rate"]
      buffers["train_losses"][:, step:end] = extras["train_loss"]
      if record_grads:
        buffers["train_grads"][:, step:end] = extras["train_grads"]
        buffers["test_grads"][:, step:end] = extras["test_grads"]
      if progress:
        _logger.info("train_runs: step %d/%d  mean train loss %.4f  mean test loss "
                     "%.4f  %.2f steps/s%s  elapsed %.1fs  ETA %.1fs", end, num_steps,
                     float(np.mean(extras["train_loss"])),
                     float(np.mean(test_losses[:, -1])), (end - step) / elapsed,
                     " (incl. compile)" if first_segment else "",
                     time.perf_counter() - train_start,
                     (stop - end) * elapsed / max(end - step, 1))
      first_segment = False
      step = end
      at_checkpoint = (checkpoint_every and step % checkpoint_every == 0) or (
          step in (stop, num_steps))
      if runs_manager is not None and at_checkpoint:
        runs_manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            trace=ocp.args.StandardSave(buffers),
            meta=ocp.args.JsonSave(dict(job, step=step))))
      if tracin_due(step):
        if tracin_manager is not None:
          if step not in tracin_manager.all_steps():
            tracin_manager.save(step, args=ocp.args.StandardSave(params))
        else:
          memory_checkpoints[step] = sharding_lib.to_host(params)
  except BaseException:
    # Checkpoints already written stay valid; release the managers and re-raise.
    for manager in (runs_manager, tracin_manager):
      if manager is not None:
        manager.close()
    raise

  if runs_manager is not None:
    runs_manager.wait_until_finished()
    tracin_manager.wait_until_finished()
    checkpoint_steps = [s for s in sorted(tracin_manager.all_steps()) if s <= step]
    runs_manager.close()
    tracin_manager.close()
    checkpoint_params = None
  else:
    checkpoint_steps = sorted(memory_checkpoints)
    checkpoint_params = jax.tree_util.tree_map(
        lambda *xs: np.stack(xs), *[memory_checkpoints[s] for s in checkpoint_steps])

  name = optim.config_field(optimizer_config, "optimizer", "sgd")
  trace_metadata = {
      "optimizer": name,
      "learning_rate": float(optim.config_field(optimizer_config, "learning_rate")),
      "lr_schedule": optim.config_field(optimizer_config, "lr_schedule", "constant"),
      "learning_rate_meaning": optim.LEARNING_RATE_MEANING[name],
      "projection_seed": int(seed) if record_grads else None,
      **(metadata or {}),
  }
  grads = {}
  if record_grads:
    grads = {"train_grads": buffers["train_grads"][:, :step],
             "test_grads": buffers["test_grads"][:, :step]}
  if step == 0:
    raise ValueError("train_runs: no step was trained (max_steps=0); a trace needs "
                     "at least one step.")
  trace = trace_lib.Trace(
      batch_ids=batch_ids[:, :step], losses=buffers["losses"][:, :step + 1],
      learning_rates=buffers["learning_rates"][:, :step],
      num_train_examples=num_train, metadata=trace_metadata, **grads)
  return TrainResult(trace=trace, params=sharding_lib.to_host(params),
                     train_losses=buffers["train_losses"][:, :step].copy(),
                     checkpoint_steps=checkpoint_steps, workdir=workdir,
                     checkpoint_params=checkpoint_params, resumed_step=resumed_step)


def _restore(manager, step, params, opt_state, buffers, job, workdir):
  """Restores state and trace buffers of `step`, checking it is the same job."""
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  meta = dict(meta["meta"])
  meta.pop("step", None)
  _refuse_other_job(workdir, meta, job)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(checkpoints.abstract_tree(
          {"params": params, "opt_state": opt_state})),
      trace=ocp.args.StandardRestore(buffers)))
  trace_buffers = {name: np.array(value) for name, value in restored["trace"].items()}
  if not np.array_equal(trace_buffers["batch_ids"], buffers["batch_ids"]):
    raise ValueError(f"train_runs: {workdir!r} was trained with different batch_ids; "
                     "use a fresh workdir.")
  state = restored["state"]
  return state["params"], state["opt_state"], trace_buffers


def _refuse_other_job(workdir: str, stored: dict, job: dict) -> None:
  """ValueError naming every field in which `stored` (the workdir's) differs."""
  job = {k: v for k, v in job.items() if k in stored or k not in _ADDED_LATER}
  changed = fingerprint_lib.differences(stored, job)
  if changed:
    raise ValueError(
        f"train_runs: {workdir!r} holds checkpoints of a different job, not resumed "
        f"(they are kept); changed: {'; '.join(changed)}. Use a fresh workdir.")


def _check_job_file(workdir: str, job: dict) -> None:
  """Compares with, or writes, the workdir's fingerprint before any checkpoint.

  Also guards what the checkpoints' meta cannot: a workdir whose job stopped (e.g.
  diverged) before its first resumable checkpoint still holds its TracIn step-0
  params, which a job with other base params must not adopt.
  """
  root = _io.as_path(workdir)  # local or a bucket (gs://...)
  path = root / JOB_FILE
  # Decided on process 0 for every process (a collective), before it writes.
  has_job_file, has_checkpoints = (bool(x) for x in sharding_lib.agree(np.array([
      path.exists(),
      any((root / name).is_dir() for name in (
          checkpoints.TRACIN_CKPT_DIR, checkpoints.RUNS_CKPT_DIR))])))
  if has_job_file:
    _refuse_other_job(workdir, json.loads(path.read_text()), job)
  elif not has_checkpoints and sharding_lib.is_primary():
    # (A workdir of an older version has checkpoints but no job file: their meta
    # is checked on restore.)
    _io.write_text(path, json.dumps(job, indent=1, sort_keys=True))
