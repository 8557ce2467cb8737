"""Flax linen models: a small byte-level Transformer LM and an MLP classifier.

Both are plain linen modules whose linear maps are all `nn.Dense`, so the influence
kernels find their layers without any model changes. `get_model` builds one from the
`config.model` section of an experiment config.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from simfluence_jax.models import mlp
from simfluence_jax.models import transformer
from simfluence_jax.models.mlp import MLPClassifier
from simfluence_jax.models.transformer import TransformerLM

MODEL_NAMES = ("transformer", "mlp")


def _field(config: Any, name: str, default: Any = None) -> Any:
  """Reads `name` from a ConfigDict, dataclass-like object or plain dict."""
  if isinstance(config, dict):
    return config.get(name, default)
  if hasattr(config, "get"):  # ml_collections.ConfigDict
    return config.get(name, default)
  return getattr(config, name, default)


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
      `config.model.factory` that cannot be imported or returns no linen module.
  """
  factory = _field(model_config, "factory")
  if factory:
    return _from_factory(factory, model_config, vocab_size=vocab_size,
                         num_classes=num_classes, max_len=max_len)
  name = _field(model_config, "name")
  if name == "transformer":
    vocab_size = vocab_size or _field(model_config, "vocab_size")
    if not vocab_size:
      raise ValueError("config.model: the transformer needs a vocab_size (from the "
                       "dataset or config.model.vocab_size).")
    defaults = {field: getattr(TransformerLM, field) for field in (
        "d_model", "num_layers", "num_heads", "d_ff", "max_len", "dropout", "use_bias")}
    kwargs = {field: _field(model_config, field, default)
              for field, default in defaults.items()}
    if max_len:
      kwargs["max_len"] = max_len
    return TransformerLM(vocab_size=int(vocab_size), **kwargs)
  if name == "mlp":
    num_classes = num_classes or _field(model_config, "num_classes")
    if not num_classes:
      raise ValueError("config.model: the mlp needs num_classes (from the dataset or "
                       "config.model.num_classes).")
    hidden_sizes = _field(model_config, "hidden_sizes", MLPClassifier.hidden_sizes)
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
