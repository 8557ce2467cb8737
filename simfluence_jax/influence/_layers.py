"""Finds the layers of an unmodified Flax model (linen or NNX) and captures their tokens.

The model is traced with every call of a registered layer kind intercepted (linen:
`nn.intercept_methods`; NNX: the registered classes' `__call__` is wrapped while
tracing). A call records its input and adds a zero "probe" to its output; the
gradient of the summed per-example values with respect to the probes is the output
gradient `g` of every example (examples do not interact inside the model), so one
forward and backward pass gives, for each layer, the per-token `a` and `g` (the
layer's `CurvatureBlock` turns the call into tokens). When the per-example
gradients of other parameter leaves are also wanted (TracIn), the pass is
`vmap`-ped over examples.

Layers are named by their module path (linen) or by the path of their kernel in
`params` (NNX, found by identity of the `nnx.Param` the merged module holds).
Covered by default: Dense / DenseGeneral / Conv (linen) and Linear / LinearGeneral /
Conv (NNX); Embed with `kinds=`. A module called several times counts each call as
extra tokens; so do NNX modules sharing one kernel and one bias (or none) with one
configuration, while modules sharing a kernel but not their biases (or with other
configurations) cannot be one block: that layer is refused or left out (`strict`). Not covered (zero contribution to EK-FAC scores, as in Grosse et al.
2023 and Kronfluence): normalisation layers and any other parameter; a warning
lists them once. Boxed parameters (`nn.Partitioned`, `nn.LogicallyPartitioned`,
anything `nn.meta.unbox` strips) are unboxed first.

Discovery audits every layer on the jaxpr of `fn` traced at two batch sizes, with
each call in a named scope of its own (`_leaf_uses`): a layer is used only when its
input and output have the examples on their leading axis and its kernel and bias
are leaves that nothing but its own top-level calls uses. A weight read outside
its calls (a tied embedding through `attend` or read directly, a transformed
parameter, a weight penalty), a call inside a nested transform (nn.remat, nn.scan)
or a shared table fail it; TracIn then takes those leaves from plain per-example
gradients, EK-FAC refuses the layer (`strict`). A layer whose weights no leaf of
`params` holds is frozen: skipped.
"""

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import re
import threading
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple
import warnings

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _closures
from simfluence_jax.influence import _blocks
from simfluence_jax.influence._nnx import nnx  # flax.nnx once the user imports it

_warned_messages = set()


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static description of one discovered layer.

  Attributes:
    name: module path joined by "/", e.g. "Dense_0" or "block_0/attention/query"
      (NNX: the path of the kernel's module in `params`).
    kind: the module class, e.g. "Dense", "DenseGeneral", "Conv", "nnx.Linear".
    in_axes: contracted input axes, negative (dense layers; () otherwise).
    num_feature_axes: trailing output axes that hold the features.
    input_dim: I0 = product of the contracted input sizes (without the bias
      column); for Conv the patch size C·prod(kernel_size), for Embed the vocab.
    output_dim: O = product of the feature sizes.
    has_bias: whether a column of ones is appended to the inputs.
    kernel_path: keys of the kernel (Embed: embedding) leaf in `params`.
    bias_path: keys of the bias leaf in `params`, or None.
    num_calls: how many times the module is called per forward pass.
    block: the `CurvatureBlock` name ("dense", "conv", "embed", or registered).
    config: kind-specific static configuration, a tuple of (key, value) pairs.
    kernel_shape: shape of the kernel leaf.
    param_dtype: dtype of the kernel leaf.
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
  block: str = "dense"
  config: Tuple[Tuple[str, Any], ...] = ()
  kernel_shape: Tuple[int, ...] = ()
  param_dtype: str = "float32"

  @property
  def augmented_input_dim(self) -> int:
    """I = I0 + 1 with a bias, else I0."""
    return self.input_dim + int(self.has_bias)


class LayerActivations(NamedTuple):
  """Per-token statistics of one layer for a batch.

  Attributes:
    inputs: float32[B, T, I] layer inputs `a`, with a column of ones for the bias
      (Embed: int32[B, T] token ids, the one-hot `a` never formed).
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


# --- parameter trees -------------------------------------------------------------------


def _key_name(key) -> Optional[str]:
  # An NNX Variable (and a flax box) flattens to its `.value`: not part of the name.
  if isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value":
    return None
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _path_names(path) -> Tuple[str, ...]:
  return tuple(n for n in (_key_name(k) for k in path) if n is not None)


def _leaf_paths(params) -> Dict[Tuple[str, ...], Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {_path_names(path): leaf for path, leaf in flat}


def unbox(params):
  """`params` without flax metadata boxes; an `nnx.Module` becomes its Param state."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  return nn.meta.unbox(params)


def is_boxed(params) -> bool:
  leaves = jax.tree_util.tree_leaves(
      params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return any(isinstance(x, nn.meta.AxisMetadata) for x in leaves)


def _variable_paths(params) -> Dict[int, Tuple[str, ...]]:
  """id(nnx.Variable) -> its path in `params` (empty for linen parameter dicts)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {id(leaf): _path_names(path) for path, leaf in flat
          if isinstance(leaf, nnx.Variable)}


def param_fingerprint(params) -> str:
  """Hash of every leaf's path, shape and dtype (not of the values)."""
  entries = sorted((list(path), list(np.shape(leaf)), str(np.dtype(leaf.dtype)))
                   for path, leaf in _leaf_paths(params).items())
  return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def param_values_checksum(params) -> str:
  """Checksum of every parameter's bits (hex): equal for the same values, and, for
  any other values, different but for a 2⁻⁶⁴-scale collision.

  Two wrapping uint32 sums per leaf, Σ_k bits_k·w_k over odd weights w_k of the
  element's position, computed on the device where the leaves are (no copy to the
  host): integer sums do not depend on the order of the reduction, so the value is
  the same on any mesh and device count, and a change of any one element always
  changes it.
  """
  return _closures.hex_checksum(
      [leaf for _, leaf in sorted(_leaf_paths(params).items())])


def describe_checksum_change(params, fitted: str, checksum: str,
                             here: str = "params") -> str:
  """Which parameter's values differ between two `param_values_checksum`s (the
  second of `params`): its name and its two 16-digit sums, or both checksums'
  lengths where the leaves differ in number."""
  names = ["/".join(name) for name in sorted(_leaf_paths(params))]
  blocks = lambda text: [text[i:i + 16] for i in range(0, len(text), 16)]
  old, new = blocks(fitted), blocks(checksum)
  if len(old) != len(new) or len(new) != len(names):
    return (f"the factors' checksum covers {len(old)} arrays, here there are "
            f"{len(names)}")
  changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
  return (f"{len(changed)} of {len(names)} arrays differ, first "
          f"{names[changed[0]]!r}: checksum {old[changed[0]]} in the factors, "
          f"{new[changed[0]]} for {here}")


# --- interception ------------------------------------------------------------------------

_local = threading.local()
_patch_lock = threading.Lock()
_patch_count = [0]
_originals: Dict[Tuple[type, str], Any] = {}


def _handlers():
  if not hasattr(_local, "handlers"):
    _local.handlers = []
  return _local.handlers


def _nnx_wrapper(original, method):
  @functools.wraps(original)
  def wrapper(self, *args, **kwargs):
    handlers = _handlers()
    if not handlers:
      return original(self, *args, **kwargs)
    return handlers[-1](self, method, functools.partial(original, self), args, kwargs)
  return wrapper


def _install_nnx_patches():
  with _patch_lock:
    _patch_count[0] += 1
    if _patch_count[0] > 1:
      return
    for module_class in _blocks.registered_module_classes():
      if not issubclass(module_class, nnx.Module):
        continue
      block_class = _blocks.block_for_module_class(module_class)
      for method in ("__call__",) + block_class.weight_reading_methods:
        original = getattr(module_class, method, None)
        if original is None:
          continue
        _originals[(module_class, method)] = module_class.__dict__.get(method)
        setattr(module_class, method, _nnx_wrapper(original, method))


def _remove_nnx_patches():
  with _patch_lock:
    _patch_count[0] -= 1
    if _patch_count[0]:
      return
    for (module_class, method), original in _originals.items():
      if original is None:
        delattr(module_class, method)
      else:
        setattr(module_class, method, original)
    _originals.clear()


@contextlib.contextmanager
def intercept(handler):
  """Routes Flax module calls through `handler` while tracing.

  `handler(module, method_name, call, args, kwargs)` must return `call(*args,
  **kwargs)` or a replacement. It sees every linen module method call and, for
  NNX, the `__call__` (and weight-reading methods) of the registered classes.
  """
  def linen_interceptor(next_fun, args, kwargs, context):
    return handler(context.module, context.method_name, next_fun, args, kwargs)

  handlers = _handlers()
  handlers.append(handler)
  _install_nnx_patches()
  try:
    with nn.intercept_methods(linen_interceptor):
      yield
  finally:
    handlers.pop()
    _remove_nnx_patches()


def _kind_name(module) -> str:
  prefix = "nnx." if isinstance(module, nnx.Module) else ""
  return prefix + type(module).__name__


class _Locator:
  """Names a module and finds its parameter leaves in `params`."""

  def __init__(self, params):
    self.leaf_paths = _leaf_paths(params)
    self.variable_paths = _variable_paths(params)
    self.unnamed = {}

  def _linen_leaf(self, module_path, leaf_name):
    """Path of the unique leaf ending in `module_path + (leaf_name,)`, or None."""
    suffix = tuple(module_path) + (leaf_name,)
    matches = [p for p in self.leaf_paths if p[len(p) - len(suffix):] == suffix]
    # A module path is a suffix of several leaves only for nested duplicates; the
    # shortest (closest to the root) is the one the module reads.
    matches.sort(key=len)
    if not matches or (len(matches) > 1 and len(matches[0]) == len(matches[1])):
      return None
    return matches[0]

  def locate(self, module, block_class):
    """(name, kernel path or None, bias path or None)."""
    if isinstance(module, nnx.Module):
      kernel = getattr(module, block_class.kernel_name, None)
      kernel_path = self.variable_paths.get(id(kernel))
      bias = (getattr(module, block_class.bias_name, None)
              if block_class.bias_name else None)
      bias_path = self.variable_paths.get(id(bias)) if bias is not None else None
      if kernel_path is not None:
        name = "/".join(kernel_path[:-1]) or _kind_name(module)
      else:
        name = self.unnamed.setdefault(
            id(module), f"{_kind_name(module)}#{len(self.unnamed)}")
      return name, kernel_path, bias_path
    module_path = tuple(str(p) for p in module.path)
    # The root module has an empty path; its class name keeps names non-empty.
    name = "/".join(module_path) or type(module).__name__
    bias_path = (self._linen_leaf(module_path, block_class.bias_name)
                 if block_class.bias_name else None)
    return name, self._linen_leaf(module_path, block_class.kernel_name), bias_path


# --- discovery ---------------------------------------------------------------------------


def example_shapes(batch, size: int = 1):
  """Shape and dtype of a batch of `size` examples like `batch`'s (for
  `jax.eval_shape`; slicing a device array would compile a program)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((size,) + tuple(np.shape(x)[1:]), x.dtype), batch)


# Discovery traces every layer call inside a named scope `_TAG<k>`, so the jaxpr
# shows which call each equation belongs to, and so which layer's calls use each
# parameter leaf (`_leaf_uses`).
_TAG = "simfluence_layer"
_TAG_PATTERN = re.compile(_TAG + r"(\d+)")
# Primitives that pass a parameter on unchanged (up to rounding): a use through
# them is a use of the parameter itself (e.g. a cast to bfloat16 in the loss).
_FORWARDING = frozenset({"convert_element_type", "sharding_constraint", "copy",
                         "copy_p"})
# Batch sizes discovery traces at: a layer's leading axis must be the example axis
# at both (a fixed size can equal one of them, not both).
_DISCOVERY_SIZES = (2, 3)


def _new_entry():
  return dict(module=None, foreign=set(), num_calls=0, axis=None)


def _axis_problem(inputs, outputs, size: int) -> Optional[str]:
  """Why a call's tokens would not be per example, or None: its input and output
  must have the batch's examples on their leading axis."""
  lead = lambda x: np.shape(x)[0] if np.ndim(x) else None
  if lead(inputs) == size and lead(outputs) == size:
    return None
  return (f"for a batch of {size} examples its input has shape "
          f"{tuple(np.shape(inputs))} and its output {tuple(np.shape(outputs))}: the "
          f"leading axis must be the example axis (time-major inputs, examples "
          f"flattened or concatenated along it, or a table shared by every example "
          f"make its tokens another example's)")


def _describe_calls(fn, params, batch):
  """Traces `fn` at the two `_DISCOVERY_SIZES`.

  Returns:
    (every intercepted call by layer name, in call order; the modules called; the
    uses of each parameter leaf, the layers whose calls run in the traced function
    itself rather than inside a nested transform, the leaves each layer's calls
    read, and the leaves the values do not depend on: `_leaf_uses`).
  """
  calls = collections.OrderedDict()
  seen = collections.Counter()
  tags = []  # by tag number: (layer name, method)

  def traced(params, batch, size, first):
    locator = _Locator(params)

    def handler(module, method, call, args, kwargs):
      block_class = _blocks.block_for_module(module)
      if first and method == "__call__":
        seen[_kind_name(module)] += 1
      if block_class is None or (method != "__call__" and method
                                 not in block_class.weight_reading_methods):
        return call(*args, **kwargs)
      name, kernel_path, bias_path = locator.locate(module, block_class)
      if not first and name not in calls:
        return call(*args, **kwargs)  # e.g. a jitted apply replaying its cache
      entry = calls.setdefault(name, _new_entry())
      tag = f"{_TAG}{len(tags)}"
      tags.append((name, method))
      if method != "__call__":
        entry["foreign"].add(method)
        with jax.named_scope(tag):
          return call(*args, **kwargs)
      inputs = block_class.call_inputs(args, kwargs)
      with jax.named_scope(tag):
        outputs = call(*args, **kwargs)
      if entry["axis"] is None:
        entry["axis"] = _axis_problem(inputs, outputs, size)
      if not first:
        return outputs
      entry["num_calls"] += 1
      try:
        description, problem = block_class.describe(module, inputs, outputs), None
      except _blocks.UnsupportedLayerError as error:
        description, problem = None, str(error)
      call_kind = _kind_name(module)
      if entry["module"] is None:
        entry.update(module=module, kind=call_kind, block=block_class,
                     description=description, problem=problem,
                     kernel_path=kernel_path, bias_path=bias_path,
                     nnx=isinstance(module, nnx.Module), conflict=None)
      elif entry["conflict"] is None:
        entry["conflict"] = problem or _call_conflict(
            block_class, (entry["kind"], entry["bias_path"], entry["description"]),
            (call_kind, bias_path, description))
      return outputs

    with intercept(handler):
      return fn(params, batch)

  first, second = _DISCOVERY_SIZES
  closed = jax.make_jaxpr(functools.partial(traced, size=first, first=True))(
      params, example_shapes(batch, first))
  uses, present, reads, unused = _leaf_uses(closed.jaxpr, params, tags)
  jax.eval_shape(functools.partial(traced, size=second, first=False), params,
                 example_shapes(batch, second))
  return calls, seen, uses, present, reads, unused


# Inside a layer's call its kernel and bias may only be reshaped, cast or broadcast
# on their way to the contraction (or the bias's addition); anything else (a custom
# dot_general scaling the kernel, a registered kind applying a function of it)
# makes the captured tokens another value's gradient than the leaf's.
_STRUCTURAL = _FORWARDING | {"reshape", "transpose", "broadcast_in_dim", "squeeze",
                             "expand_dims"}
_APPLYING = frozenset({"dot_general", "conv_general_dilated", "gather",
                       "dynamic_slice", "add", "add_any"})


def _inner_jaxpr(eqn):
  """The jaxpr of a call equation (an inner jit), or None for other primitives."""
  if eqn.primitive.name not in ("pjit", "jit", "closed_call", "core_call"):
    return None
  inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  return getattr(inner, "jaxpr", inner)


def _users(jaxpr) -> Dict[Any, list]:
  """Variable -> the equations of `jaxpr` that read it."""
  users = collections.defaultdict(list)
  for eqn in jaxpr.eqns:
    for var in eqn.invars:
      if isinstance(var, jax_core.Var):
        users[var].append(eqn)
  return users


def _walk(jaxpr, position, passing, ending):
  """Follows invar `position` of `jaxpr` through `passing` primitives (and inner
  jits) to `ending` ones. Returns (positions of the outvars it reaches, the first
  other primitive's name or None)."""
  users = _users(jaxpr)
  outs = {id(v): k for k, v in enumerate(jaxpr.outvars)
          if isinstance(v, jax_core.Var)}
  reached, pending, seen = set(), [jaxpr.invars[position]], set()
  while pending:
    var = pending.pop()
    if id(var) in seen:
      continue
    seen.add(id(var))
    if id(var) in outs:
      reached.add(outs[id(var)])
    for eqn in users[var]:
      name, inner = eqn.primitive.name, _inner_jaxpr(eqn)
      if name in ending:
        continue
      if name in passing:
        pending.extend(eqn.outvars)
        continue
      if inner is None:
        return reached, name
      for k, v in enumerate(eqn.invars):
        if v is var:
          inner_reached, other = _walk(inner, k, passing, ending)
          if other is not None:
            return reached, other
          pending.extend(eqn.outvars[j] for j in inner_reached)
  return reached, None


def _leaf_uses(jaxpr, params, tags):
  """Which layer calls use each parameter leaf, and how, read from the jaxpr of the
  first discovery trace.

  Returns:
    ({leaf path: (names of the layers whose `__call__` uses it, descriptions of its
    uses outside any layer call, descriptions of what transforms it inside one)},
    names of the layers with an equation of a call at the top level of the jaxpr,
    {layer name: the set of leaves each of its calls uses, one set per call}, the
    leaves the values do not depend on, e.g. a head the loss ignores). A use
    inside a nested jaxpr (nn.remat, nn.scan) is the nested equation's, outside
    the layer, and a layer called only in there has no top-level equation; an
    inner jit outside the layers that only casts a leaf passes it on.
  """
  def owner(eqn):
    found = _TAG_PATTERN.findall(str(eqn.source_info.name_stack))
    return int(found[-1]) if found else None  # the innermost call

  users = _users(jaxpr)
  present = {tags[tag][0] for tag in map(owner, jaxpr.eqns)
             if tag is not None and tags[tag][1] == "__call__"}
  paths = list(_leaf_paths(params))
  if len(paths) != len(jax.tree_util.tree_leaves(params)):
    raise ValueError("find_layers: params has leaves that are not arrays.")
  reads = {k: set() for k, (_, method) in enumerate(tags) if method == "__call__"}
  # Variables the values depend on (an equation with one such output reads all
  # its inputs): a leaf outside them has a zero gradient for every example.
  live = {id(v) for v in jaxpr.outvars if isinstance(v, jax_core.Var)}
  for eqn in reversed(jaxpr.eqns):
    if any(id(v) in live for v in eqn.outvars):
      live.update(id(v) for v in eqn.invars if isinstance(v, jax_core.Var))
  uses = {}
  for path, var in zip(paths, jaxpr.invars):
    layers, outside, transformed, pending = set(), [], [], [var]
    while pending:
      var = pending.pop()
      for eqn in users[var]:
        tag = owner(eqn)
        name, inner = eqn.primitive.name, _inner_jaxpr(eqn)
        position = next(k for k, v in enumerate(eqn.invars) if v is var)
        if tag is not None and tags[tag][1] == "__call__":
          layers.add(tags[tag][0])
          reads[tag].add(path)
          if name in _STRUCTURAL:
            pending.extend(eqn.outvars)
            continue
          other = None
          if inner is not None:
            reached, other = _walk(inner, position, _STRUCTURAL, _APPLYING)
            pending.extend(eqn.outvars[j] for j in reached)
          elif name not in _APPLYING:
            other = name
          if other is not None:
            transformed.append(f"`{other}` inside its call")
          continue
        if name in _FORWARDING:
          pending.extend(eqn.outvars)
          continue
        if inner is not None:
          reached, other = _walk(inner, position, _FORWARDING, ())
          if other is None:  # e.g. a jitted cast of the params
            pending.extend(eqn.outvars[j] for j in reached)
            continue
        where = _TAG_PATTERN.sub("", str(eqn.source_info.name_stack)).strip("/")
        call = tags[tag] if tag is not None else None
        outside.append(f"`{name}`" + (f" in {where}" if where else "")
                       + (f" of {call[0]}.{call[1]}" if call else ""))
    uses[path] = (layers, outside, transformed)
  calls = collections.defaultdict(list)
  for tag, leaves in reads.items():
    calls[tags[tag][0]].append(leaves)
  unused = {path for path, var in zip(paths, jaxpr.invars) if id(var) not in live}
  return uses, present, calls, unused


def _call_conflict(block_class, first, other) -> Optional[str]:
  """Why two calls named as one layer (NNX modules sharing one kernel Variable)
  cannot be one Kronecker block, or None when they are calls of one layer.

  `first` and `other` are (kind, bias path, description) of the calls. Calls of
  one module, or of modules sharing the kernel and the bias with one
  configuration, are one layer called twice. Modules with their own biases (or one
  with a bias and one without) are not: the block's bias column would sum both
  calls' gradients and credit them to the first module's bias.
  """
  (kind, bias_path, description), (other_kind, other_bias, other_description) = (
      first, other)
  shared = f"modules sharing its {block_class.kernel_name}"
  if bias_path != other_bias:
    show = lambda path: "no bias" if path is None else "/".join(path)
    return (f"{shared} have different biases ({show(bias_path)} vs "
            f"{show(other_bias)}); one block cannot hold their separate bias "
            f"gradients")
  if kind != other_kind or description != other_description:
    return (f"{shared} are called with different configurations ({kind} "
            f"{description} vs {other_kind} {other_description})")
  return None


_NESTED = ("it is called inside a nested transform (nn.remat / jax.checkpoint, "
           "nn.scan / nn.RNN / lax.scan, or a jit or vmap inside the model), whose "
           "inner values cannot be captured")
# A layer whose weights the traced function does not take from params: not
# covered, and no error (e.g. a frozen part of the model closed over in `fn`).
_FROZEN = "frozen"


def _resolve_layer(name, entry, leaf_paths, uses, present, reads):
  """(kernel path, bias path, None) of a discovered layer; or (None, None, why it
  cannot be used); or (None, None, _FROZEN) when its kernel is not a leaf of params.

  The leaves are the ones only this layer's calls use (`_leaf_uses`), named like
  the block's kernel and bias: a leaf that something else also uses (a tied weight
  read directly, a transformed parameter such as nn.WeightNorm, a weight penalty in
  the loss) would have gradient terms the layer's tokens do not hold.
  """
  if entry["module"] is None:
    return None, None, "only its weight-reading methods were called, never __call__"
  if entry["foreign"]:
    return None, None, (
        f"its weights are also read by {sorted(entry['foreign'])} (e.g. a tied "
        f"embedding); captured calls would miss part of the gradient")
  if entry["problem"] or entry["conflict"] or entry["axis"]:
    return None, None, entry["problem"] or entry["conflict"] or entry["axis"]
  if name not in present:
    return None, None, _NESTED
  block_class, description = entry["block"], entry["description"]

  def own(leaf_name, located):
    """(path only this layer uses, or None; why a leaf it uses is unusable)."""
    mine = [path for path, (layers, outside, _) in uses.items()
            if path and path[-1] == leaf_name and layers == {name} and not outside]
    if len(mine) == 1:
      if uses[mine[0]][2]:
        return None, (f"its {leaf_name} {'/'.join(mine[0])} is transformed by "
                      f"{uses[mine[0]][2][0]} (e.g. a custom dot_general, or a "
                      f"registered kind that does not apply it linearly): the "
                      f"layer's tokens would be another value's gradient")
      return mine[0], None
    if located is None:
      return None, None
    layers, outside, _ = uses[located]
    if not outside and name not in layers and len(layers) == 1:
      return None, None  # another layer's leaf, named like this one's (suffix)
    if outside or layers - {name}:
      others = sorted(layers - {name})
      return None, (f"its {leaf_name} {'/'.join(located)} is also used outside its "
                    f"calls, by " + (outside[0] if outside else
                                     f"layer {others[0]!r}")
                    + " (a tied weight read directly, a transformed parameter such "
                    "as nn.WeightNorm or nn.map_variables, or a weight penalty in "
                    "the loss): the layer's tokens would miss that part of its "
                    "gradient")
    return None, None

  kernel_path, problem = own(block_class.kernel_name, entry["kernel_path"])
  if problem:
    return None, None, problem
  if kernel_path is None:
    if any(name in layers for layers, _, _ in uses.values()):
      return None, None, (f"its {block_class.kernel_name} could not be told apart "
                          f"among the leaves of params its calls use")
    return None, None, _FROZEN
  shape = tuple(np.shape(leaf_paths[kernel_path]))
  if shape != tuple(description["kernel_shape"]):
    return None, None, (
        f"{block_class.kernel_name} in params has shape {shape}, its call implies "
        f"{tuple(description['kernel_shape'])} (a lifted transform such as "
        f"nn.scan / nn.vmap stacks parameters)")
  bias_path = None
  if description["has_bias"]:
    bias_path, problem = own(block_class.bias_name, entry["bias_path"])
    if problem:
      return None, None, problem
    if bias_path is None:
      return None, None, "it has a bias but no bias leaf was found in params"
  wanted = {kernel_path, bias_path} - {None}
  unread = sum(not wanted <= leaves for leaves in reads)
  if unread:
    return None, None, (
        f"{unread} of its {len(reads)} calls do not read its weights from params "
        f"(the model called again with other weights, e.g. a frozen reference or "
        f"teacher copy in the loss, or a call inside a nested transform): their "
        f"tokens would count toward weights they do not use")
  return kernel_path, bias_path, None


def find_layers(fn: Callable[..., jax.Array], params, batch, warn: bool = True,
                kinds: Optional[Sequence[str]] = None, strict: bool = True
                ) -> Tuple[LayerSpec, ...]:
  """Discovers the layers that `fn(params, batch)` calls.

  Args:
    fn: `(params, batch) -> float[B]`, e.g. `task.loss`; it must call the Flax
      modules when traced (not a pre-jitted `apply`, whose cached trace hides them).
    params: parameter pytree passed to `fn` (boxed parameters are unboxed; an
      `nnx.Module` stands for `nnx.state(module, nnx.Param)`).
    batch: a batch (only shapes of its first example are used; nothing runs).
    warn: warn once about parameters that no layer covers.
    kinds: block names to cover, e.g. ("dense", "conv", "embed"); None = the
      default kinds ("dense", "conv"); "all" = every registered kind.
    strict: raise on a layer of a covered kind that cannot be used (naming it and
      why); False = leave it out with a warning.

  Returns:
    The layers in call order.

  Raises:
    ValueError: no usable layer (the message names the likely cause), a layer that
      cannot be used when `strict`, or an unknown kind.
  """
  if not callable(fn) or isinstance(fn, nn.Module):
    raise ValueError(f"fn: expected a function (params, batch) -> float[B], e.g. "
                     f"task.loss, got {type(fn).__name__}.")
  params = unbox(params)
  if kinds is None:
    kinds = _blocks.default_block_names()
  elif kinds == "all":
    kinds = _blocks.all_block_names()
  elif isinstance(kinds, str):
    kinds = (kinds,)
  kinds = tuple(kinds)
  unknown = [k for k in kinds if k not in _blocks.all_block_names()]
  if unknown:
    raise ValueError(f"kinds: unknown layer kinds {unknown}; registered: "
                     f"{list(_blocks.all_block_names())} (or \"all\").")
  try:
    calls, seen, uses, present, reads, unused = _describe_calls(fn, params, batch)
  except ValueError:
    raise
  except Exception as error:  # pylint: disable=broad-except  # the user's model
    raise ValueError(f"find_layers: fn(params, batch) fails when traced "
                     f"({_closures.error_line(error)}); the arguments are (fn, "
                     f"params, batch).") from error
  leaf_paths = _leaf_paths(params)
  specs, problems, disabled, frozen, dead, covered = [], [], [], [], [], set()
  for name, entry in calls.items():
    block_class = entry.get("block")
    if block_class is not None and block_class.name not in kinds:
      disabled.append(f"{name!r} ({entry['kind']})")
      continue
    kernel_path, bias_path, problem = _resolve_layer(name, entry, leaf_paths, uses,
                                                     present, reads[name])
    if problem == _FROZEN:
      frozen.append(name)
      continue
    if problem is not None:
      problems.append((f"{name!r} ({entry.get('kind', '?')})", problem))
      continue
    if {kernel_path, bias_path} - {None} <= unused:
      dead.append(name)  # zero gradient for every example: nothing to cover
      continue
    d = entry["description"]
    kernel = leaf_paths[kernel_path]
    covered.add(kernel_path)
    if d["has_bias"]:
      covered.add(bias_path)
    specs.append(LayerSpec(
        name=name, kind=entry["kind"], in_axes=tuple(d["in_axes"]),
        num_feature_axes=d["num_feature_axes"], input_dim=d["input_dim"],
        output_dim=d["output_dim"], has_bias=d["has_bias"],
        kernel_path=kernel_path, bias_path=bias_path,
        num_calls=entry["num_calls"], block=block_class.name,
        config=tuple(d["config"]), kernel_shape=tuple(d["kernel_shape"]),
        param_dtype=str(np.dtype(kernel.dtype))))
  if not specs:
    raise ValueError("find_layers: no usable layer. " + _nothing_found(
        calls, seen, problems, disabled, kinds, frozen, dead))
  if problems and strict:
    raise ValueError("find_layers: layers that cannot be used (pass strict=False to "
                     "leave them out, or layers= explicitly): " + _grouped(problems))
  uncovered = ["/".join(p) for p in leaf_paths if p not in covered]
  if warn and (uncovered or problems or frozen or dead):
    _warn_once(
        f"EK-FAC covers {len(specs)} layers; excluded (zero contribution to EK-FAC "
        f"scores): parameters {uncovered}"
        + (f"; layers left out: {_grouped(problems)}" if problems else "")
        + (f"; layers whose weights are not in params (frozen): {frozen}"
           if frozen else "")
        + (f"; layers fn's values do not depend on (zero gradients): {dead}"
           if dead else ""))
  return tuple(specs)


def _grouped(problems) -> str:
  """"'a' (Dense), 'b' (Dense): why; 'c' (Conv): why": the layers of each reason,
  in order of first appearance, the reason once (a scanned decoder's 14 layers share
  one)."""
  by_reason = {}
  for label, reason in problems:
    by_reason.setdefault(reason, []).append(label)
  return "; ".join(f"{', '.join(labels)}: {reason}"
                   for reason, labels in by_reason.items())


def _nothing_found(calls, seen, problems, disabled, kinds, frozen, dead) -> str:
  if problems:
    return "Layers were found but none can be used: " + _grouped(problems) + "."
  if dead and not frozen:
    return (f"Layers were found but fn's values depend on none of them ({dead}): "
            f"their gradients are zero.")
  if frozen:
    return (f"Layers were found but no leaf of params is their weight "
            f"({frozen}): pass the params that fn applies (for linen, the "
            f"'params' collection or a tree holding it).")
  if disabled:
    return (f"Found only layers of kinds not enabled ({', '.join(disabled)}); "
            f"enabled kinds are {list(kinds)} (pass kinds=... to include them).")
  if not seen:
    return ("fn called no Flax module while traced. A pre-jitted apply "
            "(jax.jit(model.apply)), or a jax.checkpoint / jit around the loss that "
            "was traced before, replays its cached trace and hides the layers: "
            "pass the unjitted apply. An NNX model must be merged from the params "
            "inside fn (or pass the module to the task). EK-FAC finds layers of Flax "
            "modules only (register_layer_kind adds a linen or NNX module class); "
            "TracIn takes any function.")
  known = sorted(c.__name__ for c in _blocks.registered_module_classes())
  return (f"The modules called ({dict(seen)}) include no supported layer kind "
          f"({known}); register_layer_kind(module_class, BlockClass) adds one.")


# --- capture -------------------------------------------------------------------------------


def _flatten(params):
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return [_path_names(p) for p, _ in flat], [leaf for _, leaf in flat], treedef


def capture_per_example(fn, params, batch, layers: Tuple[LayerSpec, ...],
                        token_mask: Optional[jax.Array] = None,
                        wrt_paths: Sequence[Tuple[str, ...]] = (),
                        transform_example: Optional[Callable] = None,
                        example_args=None):
  """Per-example capture: tokens of every layer and gradients of other leaves.

  Without `wrt_paths`, one batched forward and backward pass (examples do not
  interact inside the model); with them, the pass is `vmap`-ped over examples so
  that the other leaves' gradients are per example.

  Args:
    fn: `(params, batch) -> float[B]` per-example values (loss or measurement).
    params: parameter pytree (unboxed).
    batch: pytree with a leading example axis B.
    layers: from `find_layers`.
    token_mask: optional float[B, L]; layers whose token grid has shape [L] use
      it as token weights, except that a token with weight 0 that carries
      gradient in any such layer of a registered kind, in `layers` or not (a
      prompt token later positions read: not padding)
      weighs the mean weight of the example's tokens with weight > 0; other
      layers weight every token 1.
    wrt_paths: leaf paths whose per-example gradients are also returned.
    transform_example: optional `(params, batch_of_one, example_arg) -> batch`
      applied before the forward pass (e.g. sampling targets); untraced by layers.
    example_args: pytree with leading axis B passed to `transform_example`.

  Returns:
    (activations by layer name, values float32[B], per-example gradients: a list
    aligned with `wrt_paths`, leaves float[B, *leaf.shape]).
  """
  if not _traced((params, batch, token_mask, example_args)):
    key = (fn, tuple(layers), tuple(map(tuple, wrt_paths)), transform_example,
           token_mask is None, example_args is None)
    try:
      hash(key)
    except TypeError:
      key = None
    if key is not None:
      # Called eagerly: one cached jitted program instead of op-by-op dispatch.
      return _jitted_capture(*key)(params, batch, token_mask, example_args)
  return _capture_per_example(fn, params, batch, layers, token_mask, wrt_paths,
                              transform_example, example_args)


def _traced(tree) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


@functools.lru_cache(maxsize=128)
def _jitted_capture(fn, layers, wrt_paths, transform_example, no_mask, no_args):
  del no_mask, no_args  # part of the key: None arguments change the program
  return jax.jit(lambda params, batch, token_mask, example_args: _capture_per_example(
      fn, params, batch, layers, token_mask, wrt_paths, transform_example,
      example_args))


# Key prefix of the capture's probes of layers not in `layers` (`real` tokens only).
_REAL_ONLY = "\x00real:"


def _capture_per_example(fn, params, batch, layers, token_mask, wrt_paths,
                         transform_example, example_args):
  paths, leaves, treedef = _flatten(params)
  index = {p: i for i, p in enumerate(paths)}
  wrt_index = [index[p] for p in wrt_paths]
  wrt_leaves = [leaves[i] for i in wrt_index]
  specs = {spec.name: spec for spec in layers}
  blocks = {spec.name: _blocks.block(spec) for spec in layers}
  if token_mask is None:
    token_mask = jnp.zeros((_num_examples(batch), 0), jnp.float32)

  def rebuild(wrt):
    all_leaves = list(leaves)
    for j, i in enumerate(wrt_index):
      all_leaves[i] = wrt[j]
    return jax.tree_util.tree_unflatten(treedef, all_leaves)

  def _real_only_call(name, call, args, kwargs, probes, record, counter):
    """A call of a registered kind's layer left out of `layers`. With a token mask
    and an output y [B, L, ...] on its grid, s·r is added to it, s = 0 of shape
    [B, L], r a fixed uneven vector over the features: ∂/∂s = Σ_features g·r per
    token, nonzero where the token carries gradient there (`real` below; uneven, so
    that a gradient summing to 0 over the features, as a LayerNorm's input's does,
    still shows), at the memory of [B, L], not of g."""
    outputs = call(*args, **kwargs)
    num_tokens = token_mask.shape[1]
    if not num_tokens or jnp.ndim(outputs) < 3 or outputs.shape[1] != num_tokens:
      return outputs
    key = f"{_REAL_ONLY}{name}#{counter[_REAL_ONLY + name]}"
    counter[_REAL_ONLY + name] += 1
    record[key] = (None, outputs)
    if probes is None:
      return outputs
    features = outputs.shape[2:]
    uneven = 1.0 + 0.5 * jnp.sin(jnp.arange(math.prod(features), dtype=jnp.float32))
    probe = probes[key][..., None] * uneven.reshape(1, 1, -1)
    return outputs + probe.reshape(outputs.shape).astype(outputs.dtype)

  def run(example_batch, probes, wrt, record):
    p = rebuild(wrt)
    locator = _Locator(p)
    counter = collections.Counter()

    def handler(module, method, call, args, kwargs):
      block_class = _blocks.block_for_module(module)
      if block_class is None or method != "__call__":
        return call(*args, **kwargs)
      name, _, _ = locator.locate(module, block_class)
      if name not in specs:
        return _real_only_call(name, call, args, kwargs, probes, record, counter)
      key = f"{name}#{counter[name]}"
      counter[name] += 1
      inputs = block_class.call_inputs(args, kwargs)
      outputs = call(*args, **kwargs)
      record[key] = (inputs, outputs)
      if probes is None:
        return outputs
      return outputs + probes[key].astype(outputs.dtype)

    with intercept(handler):
      values = fn(p, example_batch)
    return values

  def capture_batch(example_batch, mask, wrt):
    """Tokens [b, T, ...] and values [b] of a batch; grads of Σ values wrt `wrt`."""
    size = _num_examples(example_batch)

    def shapes_only(wrt):
      record = {}
      values = run(example_batch, None, wrt, record)
      return values, record

    value_shape, call_shapes = jax.eval_shape(shapes_only, wrt)
    if tuple(value_shape.shape) != (size,):
      raise ValueError(f"capture: fn must return one value per example (float[B]); "
                       f"for a batch of {size} it returned shape {value_shape.shape}.")
    for key, (inputs, outputs) in call_shapes.items():
      if key.startswith(_REAL_ONLY):
        continue
      problem = _axis_problem(inputs, outputs, size)
      if problem:
        raise ValueError(f"capture: layer {key.split('#')[0]!r}: {problem}.")
    output_shapes = {key: out for key, (_, out) in call_shapes.items()}
    for spec in layers:
      found = sum(key.startswith(spec.name + "#") for key in output_shapes)
      if found != spec.num_calls:
        raise ValueError(f"capture: layer {spec.name!r} was called {found} times, "
                         f"{spec.num_calls} expected (layers from another model?).")
    probes = {key: jnp.zeros(s.shape[:2] if key.startswith(_REAL_ONLY) else s.shape,
                             jnp.float32) for key, s in output_shapes.items()}

    def total(probes, wrt):
      record = {}
      values = run(example_batch, probes, wrt, record)
      return jnp.sum(values.astype(jnp.float32)), (
          values, {key: inputs for key, (inputs, _) in record.items()})

    (probe_grads, wrt_grads), (values, inputs) = jax.grad(
        total, argnums=(0, 1), has_aux=True)(probes, wrt)
    tokens = {spec.name: [blocks[spec.name].tokens(inputs[f"{spec.name}#{call}"],
                                                   probe_grads[f"{spec.name}#{call}"])
                          for call in range(spec.num_calls)]
              for spec in layers}
    # The mask weighs the tokens of layers whose token grid is its shape; where it
    # is 0, a token still counts if it carries gradient in any such layer: a
    # prompt token later positions read is part of the example (its activations
    # and gradients are in Σ g aᵀ), padding is not. Kronfluence counts the tokens
    # of its attention mask the same way. Left out, part of a gradient lay in the
    # null space of A and S, where eigh's basis is arbitrary: scores moved with
    # chunk size, example order and mesh by up to 2% (review h17). Every layer of
    # a registered kind says which tokens are real, covered or not, so a layer's
    # factors do not depend on which others are fitted (fitted alone, the last
    # block's mlp_out saw no prompt token: 28-72% off its share of an all-layer
    # fit; review h34). A left-out layer's output [B, L, ...] is on the grid.
    on_grid = lambda shape: bool(mask.shape[1]) and shape == tuple(mask.shape)
    real = jnp.zeros((size, mask.shape[1]), bool)
    for parts in tokens.values():
      for _, g, free_shape in parts:
        if on_grid(free_shape):
          real = real | jnp.any(g != 0, axis=tuple(range(2, g.ndim)))
    for key, g in probe_grads.items():
      if key.startswith(_REAL_ONLY):  # [B, L]: Σ_features g·r of a left-out layer
        real = real | (g != 0)
    weights_on_grid = jnp.reshape(mask.astype(jnp.float32), (size, -1))
    # Such a token weighs as the example's mean counted token, so that scaling the
    # mask scales every weight (1 for a 0/1 mask; a fixed 1 moved scores by 2.4%
    # under a mask of 0.5, review h19).
    counted = weights_on_grid > 0
    typical = jnp.sum(weights_on_grid, 1, keepdims=True) / jnp.maximum(
        jnp.sum(counted, 1, keepdims=True), 1)
    weights_on_grid = jnp.where(counted, weights_on_grid,
                                real.astype(jnp.float32) * typical)
    result = {}
    for spec in layers:
      parts = tokens[spec.name]
      result[spec.name] = LayerActivations(
          jnp.concatenate([a for a, _, _ in parts], axis=1),
          jnp.concatenate([g for _, g, _ in parts], axis=1),
          jnp.concatenate([weights_on_grid if on_grid(free_shape) else
                           jnp.ones(g.shape[:2], jnp.float32)
                           for _, g, free_shape in parts], axis=1))
    return result, values.astype(jnp.float32), wrt_grads

  token_mask = jnp.asarray(token_mask)
  if transform_example is not None:
    if example_args is None:
      example_args = jnp.zeros((_num_examples(batch),), jnp.int32)
    first = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
    batch = jax.vmap(lambda example, arg: first(transform_example(
        params, jax.tree_util.tree_map(lambda x: x[None], example), arg)))(
            batch, example_args)
  if not wrt_paths:
    # Examples do not interact inside the model, so one batched pass gives every
    # example's output gradients (the probes' gradient of the summed values).
    return capture_batch(batch, token_mask, [])

  def single(example, mask_row):
    example_batch = jax.tree_util.tree_map(lambda x: x[None], example)
    result, values, wrt_grads = capture_batch(example_batch, mask_row[None],
                                              wrt_leaves)
    return (jax.tree_util.tree_map(lambda x: x[0], result), values[0], wrt_grads)

  return jax.vmap(single)(batch, token_mask)


def _num_examples(batch) -> int:
  return int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])


def capture(fn: Callable[..., jax.Array], params, batch,
            layers: Tuple[LayerSpec, ...],
            token_mask: Optional[jax.Array] = None
            ) -> Tuple[Dict[str, LayerActivations], jax.Array]:
  """One forward and backward pass recording every layer's tokens.

  Args:
    fn: `(params, batch) -> float[B]` per-example values (loss or measurement).
    params: parameter pytree (boxed parameters are unboxed).
    batch: pytree with a leading example axis B.
    layers: from `find_layers`.
    token_mask: optional float[B, L]; layers whose token axes have shape [L] use it
      as token weights (other layers weight every token 1).

  Returns:
    (activations by layer name, values float32[B]).
  """
  activations, values, _ = capture_per_example(fn, unbox(params), batch, layers,
                                               token_mask)
  return activations, values


def per_example_layer_grads(activations: LayerActivations,
                            spec: Optional[LayerSpec] = None) -> jax.Array:
  """float32[B, O, I] per-example weight gradients `G = Σ_t g_t a_tᵀ`."""
  if spec is not None:
    return _blocks.block(spec).per_example_grads(activations)
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

  Raises:
    ValueError: a layer's kernel or bias leaf missing from `grads` (gradients of
      another part of the params than `find_layers` saw), or a kernel of another
      shape than the layer's (per-example gradients without `batched=True`).
  """
  leaves = _leaf_paths(unbox(grads))
  lead = None
  for spec in layers:
    for path in (spec.kernel_path,) + ((spec.bias_path,) if spec.has_bias else ()):
      if path not in leaves:
        raise ValueError(
            f"grads: no leaf {'/'.join(path)} (layer {spec.name!r}); pass gradients "
            f"shaped like the params find_layers saw (paths e.g. "
            f"{sorted('/'.join(p) for p in leaves)[:3]}).")
    shape = tuple(np.shape(leaves[spec.kernel_path]))
    if lead is None:
      lead = shape[:1] if batched else ()
    if spec.kernel_shape and shape != lead + tuple(spec.kernel_shape):
      raise ValueError(
          f"grads: leaf {'/'.join(spec.kernel_path)} has shape {shape}, the layer's "
          f"kernel is {tuple(spec.kernel_shape)}" + (
              "; per-example gradients need batched=True"
              if not batched and shape[1:] == tuple(spec.kernel_shape) else
              "; batched=True takes one leading example axis" if batched else "")
          + ".")
  return {spec.name: _blocks.block(spec).param_matrix(
      leaves[spec.kernel_path],
      leaves[spec.bias_path] if spec.has_bias else None, lead) for spec in layers}


def param_grads_from_layer_grads(layers: Tuple[LayerSpec, ...],
                                 layer_grads: Dict[str, jax.Array]
                                 ) -> Dict[Tuple[str, ...], jax.Array]:
  """Inverse of `layer_grads_from_param_grads` (unbatched): {leaf path: array}."""
  out = {}
  for spec in layers:
    kernel, bias = _blocks.block(spec).matrix_params(layer_grads[spec.name])
    out[spec.kernel_path] = kernel
    if spec.has_bias:
      out[spec.bias_path] = bias
  return out


def check_layers_match(layers: Tuple[LayerSpec, ...], params, argument: str,
                       fingerprint: Optional[str] = None) -> None:
  """Raises ValueError naming the first layer whose leaves differ from `params`."""
  origin = "found on" if argument == "layers" else "fitted on"
  leaves = _leaf_paths(params)
  for spec in layers:
    kernel = leaves.get(spec.kernel_path)
    where = f"{argument}: {origin} a different model: layer {spec.name!r} ({spec.kind})"
    if kernel is None:
      raise ValueError(f"{where} has no leaf {'/'.join(spec.kernel_path)} in params.")
    shape, dtype = tuple(np.shape(kernel)), str(np.dtype(kernel.dtype))
    if spec.kernel_shape and shape != tuple(spec.kernel_shape):
      raise ValueError(f"{where}: kernel shape {tuple(spec.kernel_shape)} in the "
                       f"{argument}, {shape} in params.")
    if dtype != spec.param_dtype:
      raise ValueError(f"{where}: kernel dtype {spec.param_dtype} in the {argument}, "
                       f"{dtype} in params.")
    if spec.has_bias and spec.bias_path not in leaves:
      raise ValueError(f"{where} has no bias leaf {'/'.join(spec.bias_path)} in params.")
  if fingerprint is not None and fingerprint != param_fingerprint(params):
    raise ValueError(f"{argument}: fitted on a different model: its layers match but "
                     f"other parameters differ in path, shape or dtype (fingerprint "
                     f"{fingerprint} in the factors, {param_fingerprint(params)} for "
                     f"params).")
