"""Flax linen models: a small byte-level Transformer LM and an MLP classifier.

Both are plain linen modules whose linear maps are all `nn.Dense`, so the influence
kernels find their layers without any model changes. `get_model` builds one from the
`config.model` section of an experiment config.
"""

import collections.abc
import dataclasses
import difflib
import numbers
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _checks
from simfluence_jax.models import mlp
from simfluence_jax.models import transformer
from simfluence_jax.models.mlp import MLPClassifier
from simfluence_jax.models.transformer import TransformerLM

MODEL_NAMES = ("transformer", "mlp")
# The hyperparameters `get_model` reads from `config.model` for each built-in model.
_TRANSFORMER_FIELDS = ("d_model", "num_layers", "num_heads", "d_ff", "max_len",
                       "dropout", "use_bias")
_MLP_FIELDS = ("hidden_sizes",)
# Every field a `config.model` without a factory may hold: the model's name, the
# pipeline's `factory` and `checkpoint`, the sizes the dataset usually supplies, and
# the built-in models' hyperparameters. Anything else (a typo such as `num_layer`)
# would silently leave the default in place, so `get_model` refuses it.
KNOWN_FIELDS = ("name", "factory", "checkpoint", "vocab_size", "num_classes"
                ) + _TRANSFORMER_FIELDS + _MLP_FIELDS


def _field(config: Any, name: str, default: Any = None) -> Any:
  """Reads `name` from a ConfigDict, dataclass-like object or plain dict."""
  if isinstance(config, dict):
    return config.get(name, default)
  if hasattr(config, "get"):  # ml_collections.ConfigDict
    return config.get(name, default)
  return getattr(config, name, default)


def _field_names(config: Any) -> Optional[list]:
  """The field names a dict, ConfigDict or dataclass holds (None: unknown)."""
  if isinstance(config, collections.abc.Mapping) or hasattr(config, "keys"):
    return [str(name) for name in config.keys()]
  if dataclasses.is_dataclass(config):
    return [field.name for field in dataclasses.fields(config)]
  return None


def _check_known_fields(model_config: Any) -> None:
  """Refuses a `config.model` field no built-in model reads (e.g. a typo)."""
  for name in _field_names(model_config) or ():
    if name not in KNOWN_FIELDS:
      close = difflib.get_close_matches(name, KNOWN_FIELDS, n=1)
      hint = f"did you mean {close[0]!r}? " if close else ""
      raise ValueError(f"config.model.{name}: unknown field ({hint}known: "
                       f"{', '.join(KNOWN_FIELDS)}).")


_is_int = _checks.is_int  # an integer (Python or NumPy), not a bool or a float


def _check_int(label: str, value: Any, minimum: int) -> None:
  """Refuses `value` unless it is an int ≥ `minimum`; `label` names it (a
  `config.model.` field, or a keyword argument of `get_model`)."""
  if not _is_int(value) or value < minimum:
    raise ValueError(f"{label}: must be an int ≥ {minimum}, got {value!r}.")


def _check_transformer_fields(kwargs: dict) -> None:
  """Refuses Transformer hyperparameters that would build a wrong model silently
  (e.g. num_layers=-1 builds no block at all, a float width would be truncated)."""
  _check_int("config.model.num_layers", kwargs["num_layers"], 0)
  for name in ("d_model", "num_heads", "d_ff", "max_len"):
    _check_int(f"config.model.{name}", kwargs[name], 1)
  dropout = kwargs["dropout"]
  if (isinstance(dropout, bool) or not isinstance(dropout, numbers.Real)
      or not 0 <= dropout < 1):
    raise ValueError(f"config.model.dropout: must be a rate in [0, 1), got "
                     f"{dropout!r}.")
  if not isinstance(kwargs["use_bias"], (bool, np.bool_)):
    raise ValueError(f"config.model.use_bias: must be a bool, got "
                     f"{kwargs['use_bias']!r}.")


def _check_hidden_sizes(hidden_sizes: Any) -> None:
  """Refuses MLP widths that `int()` would truncate, a str (iterated per
  character) or a width < 1."""
  if isinstance(hidden_sizes, (str, bytes)) or not isinstance(
      hidden_sizes, collections.abc.Iterable):
    raise ValueError(f"config.model.hidden_sizes: must be a sequence of ints ≥ 1, "
                     f"got {hidden_sizes!r}.")
  for index, width in enumerate(hidden_sizes):
    if not _is_int(width) or width < 1:
      raise ValueError(f"config.model.hidden_sizes: every width must be an int ≥ 1, "
                       f"got {width!r} at index {index}.")


def get_model(model_config: Any, *, vocab_size: Optional[int] = None,
              num_classes: Optional[int] = None,
              max_len: Optional[int] = None) -> nn.Module:
  """Builds the model named by `model_config.name`.

  Keyword arguments (taken from the dataset) override the config's fields of the
  same name, so a config need not repeat what the data determines.

  Args:
    model_config: the `config.model` section: `name` ("transformer" | "mlp") plus
      that model's hyperparameters (`d_model`, `num_layers`, `num_heads`, `d_ff`,
      `max_len`, `dropout`, `use_bias` | `hidden_sizes`). Missing fields take the defaults.
    vocab_size: V for the Transformer.
    num_classes: C for the MLP.
    max_len: longest sequence for the Transformer.

  Returns:
    An uninitialised linen module.

  Raises:
    ValueError: unknown `config.model.name`, or a required size is missing, or a
      `config.model.factory` that cannot be imported or returns no linen module;
      without a factory also a field outside `KNOWN_FIELDS` (e.g. a typo), an
      integer size that is not an int (num_layers ≥ 0; d_model, num_heads, d_ff,
      max_len and each hidden size ≥ 1), a str `hidden_sizes`, a dropout outside
      [0, 1) or a non-bool use_bias.
  """
  factory = _field(model_config, "factory")
  if factory:
    return _from_factory(factory, model_config, vocab_size=vocab_size,
                         num_classes=num_classes, max_len=max_len)
  _check_known_fields(model_config)
  name = _field(model_config, "name")
  if name == "transformer":
    label = "vocab_size" if vocab_size else "config.model.vocab_size"
    vocab_size = vocab_size or _field(model_config, "vocab_size")
    if not vocab_size:
      raise ValueError("config.model: the transformer needs a vocab_size (from the "
                       "dataset or config.model.vocab_size).")
    _check_int(label, vocab_size, 1)
    defaults = {field: getattr(TransformerLM, field) for field in _TRANSFORMER_FIELDS}
    kwargs = {field: _field(model_config, field, default)
              for field, default in defaults.items()}
    _check_transformer_fields(kwargs)
    if max_len:
      _check_int("max_len", max_len, 1)
      kwargs["max_len"] = max_len
    return TransformerLM(vocab_size=int(vocab_size), **kwargs)
  if name == "mlp":
    label = "num_classes" if num_classes else "config.model.num_classes"
    num_classes = num_classes or _field(model_config, "num_classes")
    if not num_classes:
      raise ValueError("config.model: the mlp needs num_classes (from the dataset or "
                       "config.model.num_classes).")
    _check_int(label, num_classes, 1)
    hidden_sizes = _field(model_config, "hidden_sizes", MLPClassifier.hidden_sizes)
    _check_hidden_sizes(hidden_sizes)
    return MLPClassifier(hidden_sizes=tuple(int(h) for h in hidden_sizes),
                         num_classes=int(num_classes))
  raise ValueError(f"config.model.name: unknown model {name!r}; expected one of "
                   f"{MODEL_NAMES}.")


def _from_factory(spec: str, model_config, **sizes) -> nn.Module:
  """`"pkg.module:fn"` -> `fn(model_config, vocab_size=, num_classes=, max_len=)`."""
  import importlib  # pylint: disable=g-import-not-at-top
  module_name, sep, function = spec.partition(":")
  if not sep or not module_name or not function:
    raise ValueError(f"config.model.factory={spec!r}: expected 'package.module:function'.")
  try:
    fn = getattr(importlib.import_module(module_name), function)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"config.model.factory={spec!r}: cannot be imported ({e}).") from e
  model = fn(model_config, **sizes)
  if not isinstance(model, nn.Module):
    raise ValueError(f"config.model.factory={spec!r}: returned "
                     f"{type(model).__name__}, not a flax.linen Module.")
  return model


def init_variables(model: nn.Module, example_inputs: jax.Array, seed: int = 0):
  """Initialises `model` from the shape of `example_inputs`.

  Args:
    model: a linen module from this package.
    example_inputs: int32[n, L] tokens or float32[n, D] features (n >= 1; only the
      first example is used).
    seed: PRNG seed of the initialisation.

  Returns:
    The variables dict `{"params": ...}` that `model.apply` takes.
  """
  # One compiled program instead of op-by-op dispatch of every initialiser (seconds
  # of a whole job's start-up on CPU for the default Transformer).
  return jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.asarray(example_inputs[:1]))


def num_params(variables) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(variables))


__all__ = ["MLPClassifier", "TransformerLM", "get_model", "init_variables",
           "num_params", "mlp", "transformer", "MODEL_NAMES"]
