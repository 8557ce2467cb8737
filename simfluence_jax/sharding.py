"""Meshes and multi-process helpers shared by training, influence and the main job.

Mesh axes (docs/design.md §6):

* `runs`: independent training runs (`training.train_runs` shards its run axis).
* `data`: train examples of a score computation, or the batch of EK-FAC statistics
  (`shard_scores`, `influence.covariance_statistics(..., axis_name="data")`).
* `columns`: test-example columns of the Simfluence solver (process-local).

The kernels stay pure functions of arrays, so a user can also `shard_map` them over
any mesh; the helpers here are the layouts the library itself uses.

Multi-process jobs (`jax.distributed`) follow one rule: every process holds the same
host (numpy) arrays. Decisions that read the filesystem are taken on process 0 and
broadcast (`agree`), files are written by process 0 only (`is_primary`), and
`barrier` keeps the processes in step where one reads what another wrote.
"""

from typing import Any, Callable, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

RUNS_AXIS = "runs"
DATA_AXIS = "data"


def make_mesh(runs: Optional[int] = None, data: Optional[int] = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A ("runs", "data") mesh over `devices` (default: every device of the job).

  Args:
    runs: size of the `runs` axis; None = all devices not used by `data`.
    data: size of the `data` axis; None = all devices not used by `runs`.
    devices: the devices (default `jax.devices()`, all processes).

  Raises:
    ValueError: the sizes do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  if runs is None and data is None:
    raise ValueError("make_mesh: give at least one of runs and data.")
  if runs is None:
    runs = count // data if data and count % data == 0 else -1
  if data is None:
    data = count // runs if runs and count % runs == 0 else -1
  if runs <= 0 or data <= 0 or runs * data != count:
    raise ValueError(f"make_mesh: runs={runs} x data={data} does not match the "
                     f"{count} devices.")
  return jax.sharding.Mesh(np.array(devices).reshape(runs, data),
                           (RUNS_AXIS, DATA_AXIS))


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


def put(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Places a pytree with `sharding`, which may span several processes.

  Host arrays and process-local jax arrays must hold the same values on every
  process (each process fills the shards of its own devices from them); arrays that
  already span processes are resharded.
  """
  def leaf(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree_util.tree_map(leaf, tree)


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
  return 1 if mesh is None else int(mesh.shape[DATA_AXIS])


def data_parallel(fn: Callable[..., Any], mesh: jax.sharding.Mesh,
                  sharded_args: Sequence[int], out_example_axis: Any = 0,
                  reduced: bool = False) -> Callable[..., Any]:
  """Jitted `shard_map` of a per-example kernel over the mesh's `data` axis.

  Args:
    fn: pure kernel `fn(*args)`; the arguments at `sharded_args` have a leading
      example axis that is split over `data`, the others are replicated.
    mesh: a mesh with a `data` axis (`make_mesh`).
    sharded_args: positions of the example-sharded arguments.
    out_example_axis: the output's example axis (an int, or a pytree of ints
      matching the output); ignored when `reduced`.
    reduced: the kernel `psum`s its output over `data` itself (e.g.
      `covariance_statistics(..., axis_name="data")`): the output is replicated.

  Returns:
    `f(*args)`; call it with arguments placed by `put` (`data_sharded(mesh)` for the
    sharded ones, `replicated(mesh)` for the rest).
  """
  spec = jax.sharding.PartitionSpec
  sharded_args = set(sharded_args)

  def wrapped(*args):
    in_specs = tuple(
        jax.tree_util.tree_map(lambda _: spec(DATA_AXIS) if i in sharded_args
                               else spec(), arg)
        for i, arg in enumerate(args))
    if reduced:
      out_specs = spec()
    else:
      out_specs = jax.tree_util.tree_map(
          lambda a: spec(*([None] * a + [DATA_AXIS])), out_example_axis)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)

  return jax.jit(wrapped)
