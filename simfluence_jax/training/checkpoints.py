"""Orbax persistence: parameter trees, resumable training state, TracIn checkpoints.

(The main job keeps its base model as the fingerprinted `base_model` stage,
`pipeline/stages.py`; `save_params` / `load_params` are the plain round trip.)

Layout of a training workdir (all written through orbax, atomically):

    workdir/runs_ckpt/<step>/     resumable state of all R runs (latest two kept):
        state/   {"params", "opt_state"}: leaves [R, ...]
        trace/   host buffers of the trace so far: losses [R, T+1, M],
                 learning_rates [R, T], train_losses [R, T], batch_ids [R, T, B]
                 (+ train_grads [R, T, B, K], test_grads [R, T, M, K])
        meta/    JSON: step, num_steps, num_runs, record_grads, projection_dim, seed
    workdir/tracin_ckpt/<step>/   params of all runs (leaves [R, ...]) at steps
                                  0, k, 2k, ..., T (all kept), for TracIn-CP
"""

import os
from typing import Any, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from simfluence_jax import _io

RUNS_CKPT_DIR = "runs_ckpt"
TRACIN_CKPT_DIR = "tracin_ckpt"


def _replicated_sharding() -> jax.sharding.Sharding:
  """Replicated over this process's devices: restored params are process-local.

  In a multi-process job every process reads the whole (small) array, so the params
  can go straight into process-local computations (influence kernels, pre-training).
  """
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("devices",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _savable(tree):
  """Process-local jax arrays -> numpy in a multi-process job (orbax saves numpy leaves
  from the primary process; it refuses host-local jax arrays). Global arrays stay."""
  if jax.process_count() == 1:
    return tree
  def leaf(x):
    if isinstance(x, jax.Array) and x.is_fully_addressable:
      return np.asarray(x)
    return x
  return jax.tree_util.tree_map(leaf, tree)


def abstract_tree(tree, sharding: Optional[jax.sharding.Sharding] = None):
  """`jax.ShapeDtypeStruct`s of `tree` (orbax restore targets).

  Each leaf keeps its array's sharding unless `sharding` is given; a leaf without
  any sharding restores as a host numpy array.
  """
  def leaf(x):
    leaf_sharding = sharding or getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=leaf_sharding)
  return jax.tree_util.tree_map(leaf, tree)


def save_params(path: str, params: Any) -> None:
  """Saves a parameter pytree to directory `path` (overwriting), blocking until done."""
  path = _io.as_path(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, _savable(params), force=True)
    checkpointer.wait_until_finished()


def load_params(path: str, like: Any = None) -> Any:
  """Restores a pytree saved by `save_params`.

  Args:
    path: the directory given to `save_params`.
    like: pytree of arrays or `jax.ShapeDtypeStruct`s giving structure, dtypes and
      (for jax arrays) shardings; None = the saved structure.

  Returns:
    The params as jax arrays, placed like `like`'s arrays or replicated over this
    process's devices (the saving topology is never assumed to still exist).
  """
  path = _io.as_path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"load_params: {os.fspath(path)!r} is not a directory "
                            "written by save_params.")
  with ocp.StandardCheckpointer() as checkpointer:
    if like is None:
      like = checkpointer.metadata(path).item_metadata.tree
      like = abstract_tree(like, _replicated_sharding())
    else:
      replicated = _replicated_sharding()
      like = jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(
              np.shape(x), x.dtype,
              sharding=getattr(x, "sharding", None) or replicated), like)
    return checkpointer.restore(path, like)


def runs_manager(workdir: str) -> ocp.CheckpointManager:
  """Manager of the resumable training state (the latest two steps are kept)."""
  # Saving is synchronous: the carried state is donated to the next segment, so
  # its buffers must have been written before training continues.
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(
      _io.as_path(workdir) / RUNS_CKPT_DIR,
      options=options, item_names=("state", "trace", "meta"))


def tracin_manager(workdir: str) -> ocp.CheckpointManager:
  """Manager of the per-run params at TracIn checkpoint steps (all kept)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(
      _io.as_path(workdir) / TRACIN_CKPT_DIR,
      options=options, item_handlers=ocp.StandardCheckpointHandler())


def tracin_steps(workdir: str) -> List[int]:
  """Steps at which TracIn params are saved in `workdir` (ascending)."""
  with tracin_manager(workdir) as manager:
    return sorted(manager.all_steps())


def load_tracin_params(workdir: str, step: int) -> Any:
  """Params of all runs at one TracIn checkpoint step.

  Returns:
    The variables pytree with numpy leaves [R, ...].
  """
  with tracin_manager(workdir) as manager:
    if step not in manager.all_steps():
      raise ValueError(f"load_tracin_params: no TracIn checkpoint at step {step} in "
                       f"{workdir!r}; saved steps: {sorted(manager.all_steps())}.")
    tree = manager.item_metadata(step).tree
    # Read whole onto this process's devices (independent of the device layout the
    # runs were trained on; in a multi-process job a sharding-free target would
    # restore as arrays spanning every process), then copied to host numpy.
    replicated = _replicated_sharding()
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated),
        tree)
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    return jax.tree_util.tree_map(np.asarray, restored)


def load_tracin_checkpoints(workdir: str) -> Tuple[List[int], Any]:
  """All TracIn checkpoints of a `train_runs` workdir.

  Returns:
    (steps [k_0=0, k_1, ..., T] of length K, variables pytree with numpy leaves
    [K, R, ...]): entry [k, r] holds run r's params after `steps[k]` steps.
  """
  steps = tracin_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"load_tracin_checkpoints: no TracIn checkpoints under "
                            f"{os.fspath(_io.as_path(workdir) / TRACIN_CKPT_DIR)!r}.")
  per_step = [load_tracin_params(workdir, step) for step in steps]
  return steps, jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_step)
