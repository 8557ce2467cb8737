"""The main job's pieces as shapes: datasets, model, base params, run counts.

Nothing is read or allocated: datasets are `jax.ShapeDtypeStruct`s of the sizes the
config names (N, M, L, the vocabulary), the model is the one `models.get_model`
builds for the main job, and its params are `jax.eval_shape` of
`models.init_variables`. The run counts follow `pipeline.stages`: `record_runs`
trains the first `num_grad_runs` fitted runs (recording gradients) in one
`train_runs` call and every other run (fitted, held-out, unseen) in another.
"""

import dataclasses
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import config_lib
from simfluence_jax import data
from simfluence_jax import models
from simfluence_jax import sharding as sharding_lib
from simfluence_jax import training

# Features per example of the bundled classification data (sklearn digits: 8x8).
_DIGITS_FEATURES, _DIGITS_CLASSES = 64, 10


@dataclasses.dataclass(frozen=True)
class Job:
  """One main job, as shapes.

  Attributes:
    config: the experiment config.
    devices: every device of the job (a TPU topology's, or this machine's).
    kind: "lm" or "classification".
    train, test: dicts of `ShapeDtypeStruct`s with leading axis N / M (no sharding).
    pretrain: the pre-training split's shapes, or None.
    vocab_size, num_classes: as `data.Dataset`'s.
    module: the linen model; loss_fn: its per-example loss (`training.make_loss_fn`).
    params: `ShapeDtypeStruct` pytree of the base variables `{"params": ...}`.
  """

  config: Any
  devices: tuple
  kind: str
  train: Dict[str, jax.ShapeDtypeStruct]
  test: Dict[str, jax.ShapeDtypeStruct]
  pretrain: Optional[Dict[str, jax.ShapeDtypeStruct]]
  vocab_size: Optional[int]
  num_classes: Optional[int]
  module: Any
  loss_fn: Any
  params: Any

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def mesh_model_sizes(self) -> tuple:
    """(`model` axis of the runs, of the score kernels); ValueError naming the
    config field that does not divide the devices."""
    return config_lib.mesh_model_sizes(self.config, self.num_devices)

  @property
  def run_slots(self) -> int:
    """Places for runs: `runs` axis size (devices over `mesh_model` per run)."""
    return self.num_devices // self.mesh_model_sizes[0]

  @property
  def num_params(self) -> int:
    return models.num_params(self.params)

  def grad_runs(self) -> int:
    """Runs of the `record_runs` call that records per-step gradients (0: none)."""
    config = self.config
    return min(config.num_grad_runs, config.num_runs) if config.record_grads else 0

  def plain_runs(self) -> int:
    """Runs of the `record_runs` call without gradients: every other run."""
    config = self.config
    unseen = config.unseen.num_runs if config.unseen.num_examples else 0
    return config.num_runs + config.num_held_out_runs + unseen - self.grad_runs()

  def held_out_runs(self) -> int:
    config = self.config
    unseen = config.unseen.num_runs if config.unseen.num_examples else 0
    return config.num_held_out_runs + unseen


def _lm_split(num: int, seq_len: int) -> Dict[str, jax.ShapeDtypeStruct]:
  # The dtypes of `data.packing.pack`.
  return {"inputs": jax.ShapeDtypeStruct((num, seq_len), jnp.int32),
          "targets": jax.ShapeDtypeStruct((num, seq_len), jnp.int32),
          "mask": jax.ShapeDtypeStruct((num, seq_len), jnp.float32)}


def _vocab_size(config) -> int:
  """The LM vocabulary the job's dataset reports (`pipeline.base_model` builds the
  model with it): bytes for the bundled sources, the decoder's for grain; a user's
  seqio Task's own vocabulary, which the plan cannot open, from
  `config.model.vocab_size`. A `config.model.vocab_size` the dataset contradicts is
  refused: the job would not use it."""
  given = config.model.get("vocab_size")
  if config.data.name == "seqio":
    if not given:
      raise ValueError("config.model.vocab_size: the plan needs the seqio Task's "
                       f"vocabulary size ({config.data.seqio_task!r} is not "
                       "opened); set it, e.g. --config.model.vocab_size=32100.")
    return int(given)
  if config.data.name == "grain":
    from simfluence_jax.data import grain_source  # pylint: disable=g-import-not-at-top
    decoder = grain_source.make_decoder(config.data)
    if decoder.kind != "lm":
      raise ValueError("config.data.grain_decoder: the plan sizes language-model "
                       f"grain data only (this decoder's kind is {decoder.kind!r}).")
    actual, source = int(decoder.vocab_size), "its grain decoder's vocabulary"
  else:
    actual, source = data.BYTE_VOCAB_SIZE, "its byte vocabulary"
  if given and int(given) != actual:
    raise ValueError(f"config.model.vocab_size={given}: the job's dataset "
                     f"(config.data.name={config.data.name!r}) has {source} of "
                     f"{actual}, which the job uses; unset it or set {actual}.")
  return actual


def build(config, devices: List[jax.Device]) -> Job:
  """The job of `config` on `devices`, as shapes.

  Raises:
    ValueError: a config the plan cannot size (named field).
  """
  num_train, num_test = config.num_train_examples, config.num_test_examples
  if config.data.name == "digits":
    kind, vocab_size, num_classes = "classification", None, _DIGITS_CLASSES
    split = lambda n: {
        "inputs": jax.ShapeDtypeStruct((n, _DIGITS_FEATURES), jnp.float32),
        "labels": jax.ShapeDtypeStruct((n,), jnp.int32)}
  else:
    kind, vocab_size, num_classes = "lm", _vocab_size(config), None
    split = lambda n: _lm_split(n, config.data.seq_len)
  pretrain = None
  if (config.data.name == "synthetic_facts" and config.data.num_pretrain_examples
      and config.pretrain_steps):
    pretrain = split(config.data.num_pretrain_examples)
  module = models.get_model(config.model, vocab_size=vocab_size,
                            num_classes=num_classes, max_len=config.data.seq_len)
  train = split(num_train)
  example = jax.ShapeDtypeStruct((1,) + train["inputs"].shape[1:],
                                 train["inputs"].dtype)
  params = jax.eval_shape(
      lambda x: models.init_variables(module, x, seed=config.seed), example)
  return Job(config=config, devices=tuple(devices), kind=kind, train=train,
             test=split(num_test), pretrain=pretrain, vocab_size=vocab_size,
             num_classes=num_classes, module=module,
             loss_fn=training.make_loss_fn(module, kind), params=params)


def place(tree: Any, sharding: Any, lead: tuple = ()) -> Any:
  """`ShapeDtypeStruct`s of `tree`'s leaves with `sharding` (and extra leading axes).

  `sharding`: one `Sharding` for every leaf, or a pytree of them with `tree`'s
  structure (`sharding.param_shardings`).
  """
  leaf = lambda x, s: jax.ShapeDtypeStruct(tuple(lead) + tuple(x.shape), x.dtype,
                                           sharding=s)
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x: leaf(x, sharding), tree)
  return jax.tree_util.tree_map(leaf, tree, sharding)


def place_params(tree: Any, mesh: jax.sharding.Mesh, leading: tuple = ()) -> Any:
  """`tree`'s leaves placed as the job places params: split over the mesh's
  `model` axis by `sharding.param_spec` (after `leading` dimensions, e.g. a query
  axis), replicated over its other axes."""
  return place(tree, sharding_lib.param_shardings(tree, mesh, leading))


def replicated_on(devices) -> jax.sharding.NamedSharding:
  """Replicated over a one-axis mesh of `devices` (one device: that device)."""
  mesh = jax.sharding.Mesh(np.array(list(devices)), ("devices",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
