"""Finds the dense layers of an unmodified linen model and captures their statistics.

The model is traced under `flax.linen.intercept_methods`: every call of an `nn.Dense`
or `nn.DenseGeneral` records its input `a` and adds a zero "probe" to its output.
The gradient of the summed per-example losses with respect to the probes is the
output gradient `g` of every example (examples do not interact inside the model), so
one forward and one backward pass give, for each layer, the per-token `a` and `g`
from which covariances and per-example weight gradients `G = Σ_t g_t a_tᵀ` follow.

Covered: `nn.Dense` and `nn.DenseGeneral` (any contracted axes, flattened to 2D;
`batch_dims` unsupported), including modules called several times (their calls count
as extra tokens). Not covered, and excluded from EK-FAC scores (they contribute
zero, as in Grosse et al. 2023 and Kronfluence): embeddings, normalisation layers,
convolutions, any other parameter, layers inside lifted transforms whose parameters
do not have the plain kernel shape, and layers whose kernel is not found in `params`.
A warning lists them once.
"""

import collections
import dataclasses
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_SUPPORTED_MODULES = (nn.Dense, nn.DenseGeneral)
_warned_messages = set()


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static description of one discovered dense layer.

  Attributes:
    name: module path joined by "/", e.g. "Dense_0" or "block_0/attention/query".
    kind: "Dense" or "DenseGeneral".
    in_axes: contracted input axes, negative (counted from the end of the input).
    num_feature_axes: trailing output axes that hold the features.
    input_dim: I0 = product of the contracted input sizes (without the bias column).
    output_dim: O = product of the feature sizes.
    has_bias: whether a column of ones is appended to the inputs.
    kernel_path: keys of the kernel leaf in `params`.
    bias_path: keys of the bias leaf in `params`, or None.
    num_calls: how many times the module is called per forward pass.
  """

  name: str
  kind: str
  in_axes: Tuple[int, ...]
  num_feature_axes: int
  input_dim: int
  output_dim: int
  has_bias: bool
  kernel_path: Tuple[str, ...]
  bias_path: Optional[Tuple[str, ...]]
  num_calls: int = 1

  @property
  def augmented_input_dim(self) -> int:
    """I = I0 + 1 with a bias, else I0."""
    return self.input_dim + int(self.has_bias)


class LayerActivations(NamedTuple):
  """Per-token statistics of one layer for a batch.

  Attributes:
    inputs: float32[B, T, I] layer inputs `a`, with a column of ones for the bias.
    output_grads: float32[B, T, O] gradients of the example's value w.r.t. outputs.
    token_weights: float32[B, T], 1 where the token counts in covariances.
  """

  inputs: jax.Array
  output_grads: jax.Array
  token_weights: jax.Array


def _warn_once(message: str) -> None:
  if message not in _warned_messages:
    _warned_messages.add(message)
    warnings.warn(message, stacklevel=3)


def _key_name(key) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _leaf_paths(params) -> Dict[Tuple[str, ...], Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {tuple(_key_name(k) for k in path): leaf for path, leaf in flat}


def _tracked_call(context) -> bool:
  return (context.method_name == "__call__"
          and type(context.module) in _SUPPORTED_MODULES)


def _module_name(module) -> str:
  # The root module has an empty path; its class name keeps names non-empty.
  return "/".join(str(part) for part in module.path) or type(module).__name__


def _call_inputs(args, kwargs):
  return args[0] if args else kwargs["inputs"]


def _find_leaf(leaf_paths, module_path, leaf_name):
  """Path of the unique leaf ending in `module_path + (leaf_name,)`, or None."""
  suffix = tuple(module_path) + (leaf_name,)
  matches = [p for p in leaf_paths if p[len(p) - len(suffix):] == suffix]
  # A module path is a suffix of several leaves only for nested duplicates; the
  # shortest (closest to the root) is the one the module reads.
  matches.sort(key=len)
  if not matches or (len(matches) > 1 and len(matches[0]) == len(matches[1])):
    return None
  return matches[0]


def find_layers(fn: Callable[..., jax.Array], params, batch,
                warn: bool = True) -> Tuple[LayerSpec, ...]:
  """Discovers the Dense / DenseGeneral layers that `fn(params, batch)` calls.

  Args:
    fn: `(params, batch) -> float[B]`, e.g. `task.loss`; it must call the linen
      modules when traced (not a pre-jitted `apply`, whose cached trace hides them).
    params: parameter pytree passed to `fn`.
    batch: a batch (only shapes are used; nothing is computed).
    warn: warn once about parameters that no layer covers.

  Returns:
    The layers in call order.

  Raises:
    ValueError: if no layer is found.
  """
  calls = collections.OrderedDict()

  def interceptor(next_fun, args, kwargs, context):
    if not _tracked_call(context):
      return next_fun(*args, **kwargs)
    module = context.module
    inputs = _call_inputs(args, kwargs)
    outputs = next_fun(*args, **kwargs)
    name = _module_name(module)
    if name in calls:
      calls[name]["num_calls"] += 1
      return outputs
    if isinstance(module, nn.Dense):
      in_axes, features = (-1,), (module.features,)
      batch_dims = ()
    else:
      in_axes = tuple(sorted(ax % inputs.ndim for ax in (
          module.axis if isinstance(module.axis, tuple) else (module.axis,))))
      in_axes = tuple(ax - inputs.ndim for ax in in_axes)
      features = (module.features if isinstance(module.features, tuple)
                  else (module.features,))
      batch_dims = module.batch_dims
    calls[name] = dict(module_path=tuple(str(p) for p in module.path),
                       kind=type(module).__name__, in_axes=in_axes,
                       features=tuple(features), batch_dims=tuple(batch_dims),
                       input_dim=math.prod(inputs.shape[ax] for ax in in_axes),
                       use_bias=bool(module.use_bias), num_calls=1)
    return outputs

  def traced(params, batch):
    with nn.intercept_methods(interceptor):
      return fn(params, batch)

  jax.eval_shape(traced, params, batch)
  leaf_paths = _leaf_paths(params)
  specs, skipped_layers, covered = [], [], set()
  for name, call in calls.items():
    kernel_path = _find_leaf(leaf_paths, call["module_path"], "kernel")
    bias_path = (_find_leaf(leaf_paths, call["module_path"], "bias")
                 if call["use_bias"] else None)
    output_dim = math.prod(call["features"])
    expected = call["input_dim"] * output_dim
    if (call["batch_dims"] or kernel_path is None
        or np.size(leaf_paths[kernel_path]) != expected
        or (call["use_bias"] and bias_path is None)):
      skipped_layers.append(name)
      continue
    covered.add(kernel_path)
    if bias_path is not None:
      covered.add(bias_path)
    specs.append(LayerSpec(
        name=name, kind=call["kind"], in_axes=call["in_axes"],
        num_feature_axes=len(call["features"]), input_dim=call["input_dim"],
        output_dim=output_dim, has_bias=bias_path is not None,
        kernel_path=kernel_path, bias_path=bias_path, num_calls=call["num_calls"]))
  if not specs:
    raise ValueError(
        "find_layers: no nn.Dense / nn.DenseGeneral layer found in params; the task's "
        "apply_fn must call linen modules when traced (do not pass a jitted apply).")
  uncovered = ["/".join(p) for p in leaf_paths if p not in covered]
  if warn and (uncovered or skipped_layers):
    _warn_once(
        f"EK-FAC covers {len(specs)} dense layers; excluded (zero contribution to "
        f"EK-FAC scores): parameters {uncovered}"
        + (f", unsupported dense layers {skipped_layers}" if skipped_layers else ""))
  return tuple(specs)


def capture(fn: Callable[..., jax.Array], params, batch,
            layers: Tuple[LayerSpec, ...],
            token_mask: Optional[jax.Array] = None
            ) -> Tuple[Dict[str, LayerActivations], jax.Array]:
  """One forward and backward pass recording every layer's inputs and output grads.

  Args:
    fn: `(params, batch) -> float[B]` per-example values (loss or measurement).
    params: parameter pytree.
    batch: pytree with a leading example axis B.
    layers: from `find_layers`.
    token_mask: optional float[B, L]; layers whose token axes have shape [L] use it
      as token weights (other layers weight every token 1).

  Returns:
    (activations by layer name, values float32[B]).
  """
  wanted = {spec.name for spec in layers}

  def run(probes, record):
    counter = collections.Counter()

    def interceptor(next_fun, args, kwargs, context):
      if not _tracked_call(context):
        return next_fun(*args, **kwargs)
      name = _module_name(context.module)
      if name not in wanted:
        return next_fun(*args, **kwargs)
      key = f"{name}#{counter[name]}"
      counter[name] += 1
      outputs = next_fun(*args, **kwargs)
      record[key] = (_call_inputs(args, kwargs), outputs)
      if probes is None:
        return outputs
      return outputs + probes[key].astype(outputs.dtype)

    with nn.intercept_methods(interceptor):
      values = fn(params, batch)
    return values

  def shapes_only(params, batch):
    record = {}
    values = run(None, record)
    return values, {key: out for key, (_, out) in record.items()}

  _, output_shapes = jax.eval_shape(shapes_only, params, batch)
  probes = {key: jnp.zeros(s.shape, jnp.float32) for key, s in output_shapes.items()}

  def total(probes):
    record = {}
    values = run(probes, record)
    return jnp.sum(values.astype(jnp.float32)), (
        values, {key: inputs for key, (inputs, _) in record.items()})

  grads, (values, inputs) = jax.grad(total, has_aux=True)(probes)
  num_examples = values.shape[0]
  result = {}
  for spec in layers:
    a_parts, g_parts, w_parts = [], [], []
    for call in range(spec.num_calls):
      key = f"{spec.name}#{call}"
      a = inputs[key].astype(jnp.float32)
      g = grads[key]
      in_axes = tuple(ax % a.ndim for ax in spec.in_axes)
      free_shape = tuple(a.shape[ax] for ax in range(a.ndim) if ax not in in_axes)
      a = jnp.moveaxis(a, in_axes, tuple(range(a.ndim - len(in_axes), a.ndim)))
      a = jnp.reshape(a, (num_examples, -1, spec.input_dim))
      g = jnp.reshape(g, (num_examples, -1, spec.output_dim))
      if (token_mask is not None and free_shape == tuple(token_mask.shape)):
        weights = jnp.reshape(token_mask.astype(jnp.float32), (num_examples, -1))
      else:
        weights = jnp.ones(a.shape[:2], jnp.float32)
      a_parts.append(a)
      g_parts.append(g)
      w_parts.append(weights)
    a = jnp.concatenate(a_parts, axis=1)
    if spec.has_bias:
      a = jnp.concatenate([a, jnp.ones(a.shape[:2] + (1,), a.dtype)], axis=-1)
    result[spec.name] = LayerActivations(
        a, jnp.concatenate(g_parts, axis=1), jnp.concatenate(w_parts, axis=1))
  return result, values


def per_example_layer_grads(activations: LayerActivations) -> jax.Array:
  """float32[B, O, I] per-example weight gradients `G = Σ_t g_t a_tᵀ`."""
  return jnp.einsum("bto,bti->boi", activations.output_grads, activations.inputs)


def layer_grads_from_param_grads(layers: Tuple[LayerSpec, ...], grads,
                                 batched: bool = False) -> Dict[str, jax.Array]:
  """Rearranges parameter gradients into the `[O, I]` layer layout.

  Args:
    layers: from `find_layers`.
    grads: pytree like `params` (per-example leaves `[B, ...]` if `batched`).
    batched: whether leaves have a leading example axis.

  Returns:
    By layer name: float32[O, I] (or [B, O, I]); kernel columns first, bias last.
  """
  leaves = _leaf_paths(grads)
  lead = (leaves[layers[0].kernel_path].shape[0],) if batched else ()
  out = {}
  for spec in layers:
    kernel = jnp.reshape(leaves[spec.kernel_path],
                         lead + (spec.input_dim, spec.output_dim))
    matrix = jnp.swapaxes(kernel, -1, -2)
    if spec.has_bias:
      bias = jnp.reshape(leaves[spec.bias_path], lead + (spec.output_dim, 1))
      matrix = jnp.concatenate([matrix, bias], axis=-1)
    out[spec.name] = matrix.astype(jnp.float32)
  return out
