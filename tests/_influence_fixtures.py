"""Brute-force references shared by the influence test modules.

Per-example gradients are explicit `jax.grad`s of a one-example loss, `vmap`-ped over
the examples and jitted once per function (a Python loop of jitted grads plus eager
reshapes per example compiled dozens of small programs per test). They use nothing of
the code under test but, where asked, `layer_grads_from_param_grads` to lay the
parameter gradients out as [O, I] per layer.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import influence


def slice_batch(batch, start, stop=None):
  """Examples [start, stop) of a batch (one example without `stop`)."""
  stop = start + 1 if stop is None else stop
  return jax.tree_util.tree_map(lambda x: x[start:stop], batch)


def init(model, *args):
  """`model.init(*args)` as one jitted program (eager, every initialiser's ops
  compiled programs of their own)."""
  return jax.jit(model.init)(*args)


def host_init(model, *args, seed=0):
  """Variables shaped like `model.init(key, *args)`'s, drawn on the host like
  flax's default initialisers: kernels ~ N(0, 1/fan_in) (fan_in: all but the last
  axis), embeddings ~ N(0, 1/features), biases 0, scales 1.

  For tests whose subject is not the initialisation: `model.init`, jitted, was a
  ~0.5 s compile per model (its random number generation); eagerly, a program per
  initialiser and shape.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = getattr(path[-1], "key", None)
    if name == "scale":
      value = np.ones(leaf.shape)
    elif name == "bias":
      value = np.zeros(leaf.shape)
    else:
      fan_in = leaf.shape[-1] if name == "embedding" else np.prod(leaf.shape[:-1])
      value = rng.standard_normal(leaf.shape) / np.sqrt(max(1, int(fan_in)))
    return jnp.asarray(value.astype(leaf.dtype))

  return jax.tree_util.tree_map_with_path(draw, shapes)


def normal(seed, shape):
  """float32 N(0, 1) test data drawn on the host (no program per shape)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def randint(seed, shape, high):
  """int32 test data in [0, high), drawn on the host."""
  return np.random.default_rng(seed).integers(0, high, shape).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _grads_program(fn):
  def one(params, example):
    example = jax.tree_util.tree_map(lambda x: x[None], example)
    return fn(params, example)[0]
  return jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0)))


def per_example_param_grads(fn, params, batch):
  """Pytree like `params`, leaves [B, ...]: `jax.grad` of `fn(params, example)[0]`
  for each one-example batch (`fn` hashable, e.g. a task's bound method)."""
  return _grads_program(fn)(params, batch)


@functools.lru_cache(maxsize=None)
def _layout_program(layers):
  return jax.jit(lambda grads: influence.layer_grads_from_param_grads(
      layers, grads, batched=True))


def per_example_layer_grads(fn, params, batch, layers):
  """By layer, numpy [B, O, I]: `per_example_param_grads` in the layers' layout."""
  grads = _layout_program(tuple(layers))(per_example_param_grads(fn, params, batch))
  return {name: np.asarray(g) for name, g in grads.items()}


@functools.lru_cache(maxsize=None)
def _precondition_program(damping):
  return jax.jit(lambda factors, grads: influence.precondition(factors, grads, damping))


def precondition(factors, layer_grads, damping: float):
  """`influence.precondition` with an explicit damping, as one jitted program
  (eagerly, each of its ops compiled a program of its own)."""
  return {name: np.asarray(g) for name, g in _precondition_program(float(damping))(
      factors, layer_grads).items()}


class CausalLM(nn.Module):
  """A toy causal LM whose tokens mix by a running mean (answer positions read the
  prompt): Embed(vocab, 4) → Dense(5) → tanh → running mean → Dense(vocab)."""
  vocab: int

  @nn.compact
  def __call__(self, tokens):
    h = nn.tanh(nn.Dense(5)(nn.Embed(self.vocab, 4)(tokens)))
    h = jnp.cumsum(h, 1) / jnp.arange(1, tokens.shape[1] + 1)[None, :, None]
    return nn.Dense(self.vocab)(h)
