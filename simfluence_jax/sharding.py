"""Meshes and multi-process helpers shared by training, influence and the main job.

Mesh axes (docs/design.md §6):

* `runs`: independent training runs (`training.train_runs` shards its run axis).
* `data`: train examples of a score computation, or the batch of EK-FAC statistics
  (`influence.covariance_statistics(..., axis_name="data")`).
* `model`: each parameter (and optimizer state, EK-FAC factor, preconditioned
  query) split along one of its dimensions, FSDP-style (`param_spec`): a run or a
  model too large for one device spans `model` devices, and XLA gathers each
  layer's weights where they are used. Size 1 (the default) replicates them.
* `columns`: test-example columns of the Simfluence solver (process-local).

The kernels stay pure functions of arrays, so a user can also `shard_map` them over
any mesh; the helpers here are the layouts the library itself uses.

Multi-process jobs (`jax.distributed`) follow one rule: every process holds the same
host (numpy) arrays. Decisions that read the filesystem are taken on process 0 and
broadcast (`agree`), files are written by process 0 only (`is_primary`), and
`barrier` keeps the processes in step where one reads what another wrote.
"""

from typing import Any, Optional, Sequence, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np

from simfluence_jax import _checks

RUNS_AXIS = "runs"
DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(runs: Optional[int] = None, data: Optional[int] = 1,
              devices: Optional[Sequence[jax.Device]] = None,
              model: int = 1) -> jax.sharding.Mesh:
  """A ("runs", "data", "model") mesh over `devices` (default: every device).

  `model` is the innermost axis, so the devices sharing one run's (or one score
  computation's) parameters are neighbours in `devices` (on a TPU slice, the
  closest chips).

  Args:
    runs: size of the `runs` axis; None = all devices not used by the others.
    data: size of the `data` axis; None = all devices not used by the others.
    devices: the devices (default `jax.devices()`, all processes).
    model: size of the `model` axis (parameter sharding, `param_spec`).

  Raises:
    ValueError: the sizes do not multiply to the number of devices, or a device
      is listed twice.
  """
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  if not count:
    raise ValueError("make_mesh: devices is empty; a mesh needs at least one device.")
  if len(set(devices)) != count:
    twice = next(d for d in devices if devices.count(d) > 1)
    raise ValueError(f"make_mesh: device {twice} is listed more than once; a mesh "
                     "holds each device once.")
  if runs is None and data is None:
    raise ValueError("make_mesh: give at least one of runs and data.")
  for name, value in (("runs", runs), ("data", data), ("model", model)):
    if value is not None and (not _checks.is_int(value) or value < 1):
      raise ValueError(f"make_mesh: {name} must be an integer >= 1, got {value!r}.")
  given = " x ".join(f"{name}={value}" for name, value in
                     (("runs", runs), ("data", data), ("model", model))
                     if value is not None)
  free = "runs" if runs is None else "data" if data is None else None
  fixed = int(model) * int(runs if runs is not None else data)
  if free is not None:
    if count % fixed:
      raise ValueError(f"make_mesh: {given} does not divide the {count} devices, "
                       f"so no size of {free} fits.")
    runs, data = ((count // fixed, data) if free == "runs" else (runs, count // fixed))
  runs, data, model = int(runs), int(data), int(model)
  if runs * data * model != count:
    raise ValueError(f"make_mesh: {given} does not match the {count} devices.")
  return jax.sharding.Mesh(np.array(devices).reshape(runs, data, model),
                           (RUNS_AXIS, DATA_AXIS, MODEL_AXIS))


def runs_mesh(model: int = 1, devices: Optional[Sequence[jax.Device]] = None
              ) -> jax.sharding.Mesh:
  """The training runs' mesh: `model` devices per run slot, the rest on `runs`."""
  return make_mesh(runs=None, data=1, model=model, devices=devices)


def scores_mesh(model: int = 1, devices: Optional[Sequence[jax.Device]] = None
                ) -> jax.sharding.Mesh:
  """The score kernels' mesh: params over `model`, train examples over `data`."""
  return make_mesh(runs=1, data=None, model=model, devices=devices)


def model_size(mesh: Optional[jax.sharding.Mesh]) -> int:
  """Size of the mesh's `model` axis (1 without one)."""
  return 1 if mesh is None else int(dict(mesh.shape).get(MODEL_AXIS, 1))


def param_spec(shape: Sequence[int], size: int) -> Tuple[Optional[str], ...]:
  """FSDP rule: which dimension of an array of `shape` `model` splits.

  The largest dimension divisible by `size` (the first of equal ones) is split over
  the `model` axis; an array with none (or `size` 1) is replicated. The rule reads
  the shape only, so params, their optimizer moments, gradients and EK-FAC factors
  of one shape always share a layout.

  Returns:
    one entry per dimension: `MODEL_AXIS` or None.
  """
  shape = tuple(int(d) for d in shape)
  spec = [None] * len(shape)
  candidates = [i for i, d in enumerate(shape) if size > 1 and d % size == 0]
  if candidates:
    spec[max(candidates, key=lambda i: (shape[i], -i))] = MODEL_AXIS
  return tuple(spec)


def param_shardings(tree: Any, mesh: jax.sharding.Mesh,
                    leading: Tuple[Optional[str], ...] = ()) -> Any:
  """Shardings of a pytree of arrays (or ShapeDtypeStructs) by `param_spec`.

  Args:
    tree: the arrays; only their shapes are read.
    mesh: a `make_mesh` mesh (a mesh without `model` replicates).
    leading: mesh axes (or None) of each leaf's leading dimensions, which the rule
      leaves alone: `(RUNS_AXIS,)` for the `[R, ...]` state of `train_runs`.

  Returns:
    a pytree of `NamedSharding`s with `tree`'s structure.
  """
  size = model_size(mesh)
  spec = jax.sharding.PartitionSpec

  def leaf(x):
    shape = tuple(np.shape(x))
    head = tuple(leading[:len(shape)])
    return jax.sharding.NamedSharding(
        mesh, spec(*head, *param_spec(shape[len(head):], size)))
  return jax.tree_util.tree_map(leaf, tree)


def is_primary() -> bool:
  """Whether this is process 0 (the one that writes files)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches `barrier(name)`; no-op with one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def agree(value: Any) -> Any:
  """Process 0's `value` (a pytree of arrays or scalars) on every process."""
  if jax.process_count() == 1:
    return value
  return jax.tree_util.tree_map(np.asarray,
                                multihost_utils.broadcast_one_to_all(value))


def put(tree: Any, sharding: Any) -> Any:
  """Places a pytree with `sharding`, which may span several processes.

  `sharding` is one `Sharding` for every leaf, or a pytree of them with `tree`'s
  structure (`param_shardings`). Host arrays and process-local jax arrays must hold
  the same values on every process (each process fills the shards of its own
  devices from them); arrays that already span processes are resharded.
  """
  def leaf(x, sharding):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x: leaf(x, sharding), tree)
  return jax.tree_util.tree_map(leaf, tree, sharding)


def to_host(tree: Any) -> Any:
  """numpy copies of a pytree, gathering shards held by other processes.

  Always a copy: on CPU `np.asarray` may alias a device buffer that a later jitted
  call donates and overwrites (as `train_runs` does with its carried state).
  """
  def leaf(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.array(multihost_utils.process_allgather(x, tiled=True))
    return np.array(x)
  return jax.tree_util.tree_map(leaf, tree)


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def data_sharded(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading axis split over the mesh's `data` axis."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def data_size(mesh: Optional[jax.sharding.Mesh]) -> int:
  """Size of the mesh's `data` axis (1 without one)."""
  return 1 if mesh is None else int(dict(mesh.shape).get(DATA_AXIS, 1))


def manual_axes(mesh: jax.sharding.Mesh) -> frozenset:
  """The axes a kernel's `shard_map` maps by hand: all but a `model` axis > 1.

  The `model` axis stays automatic: arguments placed with `param_shardings` keep
  their split inside the kernel and XLA inserts the gathers, so one kernel body
  serves replicated and model-sharded params alike. Without a split (size 1) every
  axis is manual, as without a `model` axis.
  """
  axes = frozenset(mesh.axis_names)
  return axes - {MODEL_AXIS} if model_size(mesh) > 1 else axes
