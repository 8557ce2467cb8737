"""What a function computes, read from a fresh trace: refusing a function whose
closed-over values changed under JAX's trace cache.

JAX caches a function's trace by the function object and its arguments' shapes:
values the function reads from outside (a closure over a linen model's
`batch_stats`, a global temperature, frozen weights) are baked into the first trace
as constants and literals, and every later call with the same shapes reuses them.
A task or loss function reused after such a value changed computed with the old one,
silently (review h38: TracIn 84% off, EK-FAC 88%, metagradients 11×). `check_unchanged`
traces the function anew (a fresh wrapper, which JAX has never seen, so the Python
code runs and reads the current values) and compares a digest of the trace's
operations, literals and constants with the one its owner's first call recorded.
`memoized` skips that trace while a Python-level `fingerprint` of everything the
function can read is the one the last traced check saw.
"""

import builtins
import collections
import enum
import functools
import hashlib
import re
import sys
import types
import warnings
import weakref
from typing import Any, Callable, Hashable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _checks


@jax.jit
def checksums(leaves):
  """uint32[2 · len(leaves)]: two wrapping sums per leaf, Σ_k bits_k·w_k over odd
  weights w_k of the element's position, computed where the leaves are (no copy to
  the host). Integer sums do not depend on the reduction order, so the value is the
  same on any mesh and device count, and a change of any one element changes it."""
  sums = []
  for leaf in leaves:
    x = jnp.asarray(leaf)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):  # its real and imaginary parts
      x = jnp.stack([jnp.real(x), jnp.imag(x)])
    if jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits < 8:
      x = x.astype(jnp.int8 if jnp.issubdtype(x.dtype, jnp.signedinteger)
                   else jnp.uint8)  # int4 and the like: no bitcast to a byte
    width = x.dtype.itemsize
    if width == 8:  # two uint32 words per element
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    else:
      unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
      bits = (x if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(
          x, unsigned)).astype(jnp.uint32).reshape(-1)
    k = jnp.arange(bits.size, dtype=jnp.uint32)
    sums.append(jnp.sum(bits * (k * jnp.uint32(2654435761) + jnp.uint32(1) | 1)))
    sums.append(jnp.sum(bits * ((k ^ jnp.uint32(0x9E3779B9)) * jnp.uint32(40503) | 1)))
  return jnp.stack(sums) if sums else jnp.zeros((0,), jnp.uint32)


def hex_checksum(leaves: Sequence[Any]) -> str:
  """`checksums` of `leaves` as hex (16 digits per leaf; "" for none)."""
  return "".join(f"{int(v):08x}" for v in np.asarray(checksums(tuple(leaves)))
                 ) if leaves else ""


def _array_consts(consts) -> list:
  """The constants of a trace as checksummable arrays: typed PRNG keys as their key
  data; anything that is not a numeric array is left out."""
  arrays = []
  for c in consts:
    dtype = getattr(c, "dtype", None)
    if dtype is None:
      continue
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
      c = jax.random.key_data(c)
    elif not (jnp.issubdtype(dtype, jnp.number) or dtype == jnp.bool_):
      continue
    arrays.append(c)
  return arrays


def equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs it calls (pjit, scan, cond,
  custom_jvp, ...), depth first, each as `(eqn, closed jaxprs among its params)`."""
  for eqn in jaxpr.eqns:
    subs = [sub for value in eqn.params.values()
            for sub in (value if isinstance(value, (tuple, list)) else (value,))
            if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns")]
    yield eqn, [sub for sub in subs if hasattr(sub, "consts")]
    for sub in subs:
      yield from equations(getattr(sub, "jaxpr", sub))


def all_consts(closed) -> list:
  """A trace's constants and those of the closed jaxprs it calls (an inner
  `jax.jit` keeps what it closes over in its own jaxpr: review h40, 75% off)."""
  return list(closed.consts) + [c for _, subs in equations(closed.jaxpr)
                                for sub in subs for c in sub.consts]


def error_line(error: Exception) -> str:
  """`Type: first line` of an exception raised by a user's function."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def trace(fn: Callable, *args, **kwargs):
  """`jax.make_jaxpr` of `fn(*args, **kwargs)` through a wrapper made for this call:
  JAX has no trace of it cached, so `fn`'s Python code runs and reads the values it
  closes over now."""
  return jax.make_jaxpr(lambda a, k: fn(*a, **k))(args, kwargs)


def one_example(batch):
  """The shapes and dtypes of one example of `batch` (leading axis 1), to trace
  with: no slice of the data (which may be split over processes) is taken."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((1,) + tuple(np.shape(x))[1:],
                                     jnp.result_type(x)), batch)


def operations_text(closed) -> str:
  """The printed jaxpr without object addresses (equal in every process for the same
  operations, literals and shapes)."""
  return re.sub(r" at 0x[0-9a-fA-F]+", "", str(closed.jaxpr))


def constants_summary(closed) -> str:
  """What a trace closed over, comparable across machines (`same_summary`): per
  array, a float one's size and float64 sum, sum of magnitudes and a weighted sum
  (host libraries round tables built at trace time, e.g. np.exp, differently by an
  ulp on another CPU: review h40), an integer one's bit checksum. "" for none."""
  parts = []
  for c in _array_consts(all_consts(closed)):
    if jnp.issubdtype(c.dtype, jnp.inexact):
      x = np.asarray(jax.device_get(c)).astype(np.complex128 if jnp.issubdtype(
          c.dtype, jnp.complexfloating) else np.float64).ravel()
      x = np.concatenate([x.real, x.imag]) if np.iscomplexobj(x) else x
      w = np.cos(np.arange(x.size) * 0.7548776662466927)  # fixed, position-dependent
      parts.append(f"f{x.size},{float(x.sum())!r},{float(np.abs(x).sum())!r},"
                   f"{float((w * x).sum())!r}")
    else:
      parts.append("x" + hex_checksum([c]))
  return ";".join(parts)


def same_summary(left: str, right: str, rtol: float = 1e-5) -> bool:
  """Whether two `constants_summary`s describe the same arrays: integers bit for
  bit, floats to `rtol` of their sum of magnitudes."""
  a, b = left.split(";") if left else [], right.split(";") if right else []
  if len(a) != len(b):
    return False
  for x, y in zip(a, b):
    if x[:1] != y[:1] or (x[0] == "x" and x != y):
      return False
    if x[0] == "f":
      nx, *vx = x[1:].split(",")
      ny, *vy = y[1:].split(",")
      vx, vy = [float(v) for v in vx], [float(v) for v in vy]
      scale = max(vx[1], vy[1], 1e-30)
      if nx != ny or any(abs(p - q) > rtol * scale for p, q in zip(vx, vy)):
        return False
  return True


def _text_digest(closed) -> str:
  return hashlib.sha256(operations_text(closed).encode()).hexdigest()[:16]


# owner -> {signature of the traced arguments: (operations digest, constants,
# their checksum) at the owner's first check}. Weakly keyed: never keeps a task or a
# loss function (and its model) alive; the constants are the closure's own arrays.
_FIRST = weakref.WeakKeyDictionary()
_UNCHECKED = set()  # types of owners without weak references, warned about once


def check_unchanged(owner: Any, closed, arguments: Any, message: str) -> None:
  """Raises ValueError(`message`) if `closed` (`trace` of a function on
  `arguments`) has other operations or closed-over values than the trace `owner`'s
  first check recorded for arguments of the same shapes (`owner`: the object JAX's
  and this package's caches hold, e.g. a task or a loss function). The same
  immutable arrays are not checksummed again (a 256 MB table cost 0.37 s per call:
  review h40). An owner without weak references is not checked (warned once)."""
  try:
    first = _FIRST.setdefault(owner, {})
  except TypeError:
    kind = type(owner).__name__
    if kind not in _UNCHECKED:
      _UNCHECKED.add(kind)
      warnings.warn(f"{kind} objects cannot be weakly referenced, so changes to what "
                    f"they close over are not detected; make a new one for new "
                    f"values (or give the class __weakref__).", stacklevel=3)
    return
  key = _checks.tree_signature(arguments)
  text, consts = _text_digest(closed), _array_consts(all_consts(closed))
  record = first.get(key)
  if record is None:
    first[key] = (text, consts, hex_checksum(consts))
    return
  if record[0] != text or len(record[1]) != len(consts):
    raise ValueError(message)
  if all(isinstance(a, jax.Array) and a is b for a, b in zip(consts, record[1])):
    return
  if hex_checksum(consts) != record[2]:
    raise ValueError(message)


# --- the Python-level fingerprint: when a fresh trace can be skipped -----------------
#
# Tracing the loss anew costs what tracing the model costs (a small MLP: most of a
# warm TracIn call; the default Transformer: ~40 ms per trace). `memoized` skips it
# when nothing the function can read has changed since the last check that traced
# it: its code, defaults and closure cells, the globals its code names (in the
# user's modules; a library's module globals are taken as fixed), the attributes of
# the objects it is bound to or closes over and of the users' classes it reaches
# (by name, under a library's class such as `nn.remat(Block)`, or as a metaclass),
# walked to the leaves, and JAX's and Flax's trace-time settings (config, axis
# rules, method interceptors). Leaves are compared by value (Python scalars,
# strings, NumPy scalars, dtypes by name) or by identity where the object cannot
# change (jax Arrays, code objects). Anything the walk cannot see into (a NumPy
# array, which can be written in place; a C type's own fields; a proxy; a module
# or builtin that reaches outside, such as os.environ, sys.modules, np.load) makes
# the fingerprint None, and the check traces as before; so does a walk past 20k
# objects or 200 levels, and an owner once opaque is traced without walking again.
# Reviews h41, h42 and h43 found the ways earlier versions missed a change (a class
# reached by name, a lifted transform, an import inside the function, a proxy, a
# tree structure's static data, ...); each is a test in closures_test.py.
#
# Assumed, not checked: the libraries' code is pure and their module and class
# attributes fixed (a value a user stores on `optax` or `nn.Module`, a monkeypatched
# `nn.gelu`, a file read at trace time by a library function not in
# `_OPAQUE_NAMES`, or a pytree flatten function reading a global are not seen),
# as JAX itself assumes of a jitted function. Bind such values as arguments.

# Top-level packages whose module globals and class attributes are taken as fixed
# (a user's objects of their classes are still walked, instance by instance).
_LIBRARIES = frozenset({
    "abc", "builtins", "chex", "collections", "copy", "dataclasses", "einops",
    "enum", "etils", "flax", "functools", "inspect", "itertools", "jax", "jaxlib",
    "math", "contextlib", "weakref", "re", "warnings",
    "ml_collections", "numbers", "numpy", "operator", "optax", "orbax",
    "simfluence_jax", "typing", "typing_extensions"})  # not "types": new_class
# Builtins through which code can read state the walk does not see.
_OPAQUE_NAMES = frozenset({"globals", "vars", "locals", "eval", "exec",
                           "__import__", "open", "input", "compile", "breakpoint",
                           # the libraries' readers of files (np.load, ...) and
                           # of frames (review h42)
                           "load", "loadtxt", "genfromtxt", "fromfile", "memmap",
                           "restore", "read_text", "read_bytes", "read_array",
                           "open_memmap", "fromregex", "restore_checkpoint",
                           "from_bytes", "currentframe", "f_globals", "stack"})
# What a class records about itself, not what its code reads at trace time.
_CLASS_METADATA = frozenset({
    "__module__", "__qualname__", "__doc__", "__annotations__", "__dict__",
    "__weakref__", "__slots__", "__dataclass_params__", "__dataclass_fields__",
    "__match_args__", "__abstractmethods__", "_abc_impl", "__parameters__",
    "__orig_bases__", "__firstlineno__", "__static_attributes__"})
_MAX_NODES = 20_000  # a larger closure is traced instead (review h42: a 50k-entry
                     # vocabulary walked on every call cost 118 ms; a trace, 10)
_MAX_DEPTH = 200  # whatever sys.getrecursionlimit() allows (h42: a segfault at 20k)
_SCALARS = (type(None), bool, int, str, bytes, type(Ellipsis))
_TUPLE_GETTER = type(collections.namedtuple("_Pair", "a b").a)  # a field's getter
_JIT = type(jax.jit(lambda x: x))


def _is_library(module_name) -> bool:
  return isinstance(module_name, str) and module_name.split(".")[0] in _LIBRARIES


def _library_class(klass) -> bool:
  """A class of a library module that the module exports under its qualified name;
  one a library's factory made at run time (flax's `nn.map_variables(nn.Dense,
  trans_in_fn=...)`, `nn.remat(Block)`) holds the caller's arguments in its
  methods' closures and is walked like a user's (review h42)."""
  module = getattr(klass, "__module__", None)
  if not _is_library(module):
    return False
  if not klass.__flags__ & (1 << 9):  # a static C type
    return True
  found = sys.modules.get(module)
  for part in getattr(klass, "__qualname__", "").split("."):
    found = (vars(found).get(part) if isinstance(found, (type, types.ModuleType))
             else None)  # no getattr: a module's __getattr__ may warn or import
  return found is klass


@functools.lru_cache(maxsize=4096)
def _code_names(code: types.CodeType) -> frozenset:
  """The global and attribute names `code` and the code it defines can look up."""
  names = set(code.co_names)
  for const in code.co_consts:
    if isinstance(const, types.CodeType):
      names |= _code_names(const)
  return frozenset(names)


@functools.lru_cache(maxsize=4096)
def _imports(code: types.CodeType) -> frozenset:
  """(level, module name) of every import statement in `code` and the code it
  defines: a module imported at trace time is read without a global naming it."""
  import dis  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  found, instructions = set(), list(dis.get_instructions(code))
  for k, ins in enumerate(instructions):
    if ins.opname == "IMPORT_NAME":  # after LOAD_CONST level, LOAD_CONST fromlist
      load = instructions[k - 2] if k >= 2 else None
      level = load.argval if load is not None and load.opname == "LOAD_CONST" else 1
      found.add((level if isinstance(level, int) else 1, ins.argval))
  for const in code.co_consts:
    if isinstance(const, types.CodeType):
      found |= _imports(const)
  return frozenset(found)


class _Opaque(Exception):
  """Something the fingerprint cannot see into."""


class Fingerprint:
  """What a function can read, as a hashable key, with the objects it compares by
  identity: weakly where they allow it (an array, a class, a code object: a
  remembered fingerprint must not keep a task alive through them), strongly where
  they do not (builtins, descriptors, which hold no user objects). A
  fingerprint one of whose objects died equals no other: its id may be reused."""

  def __init__(self, key: Hashable, kept: list):
    self.key, self._kept = key, kept

  def alive(self) -> bool:
    return all(ref() is not None for ref in self._kept
               if isinstance(ref, weakref.ReferenceType))

  def __eq__(self, other):
    return (isinstance(other, Fingerprint) and self.key == other.key
            and self.alive() and other.alive())

  __hash__ = None


def _trace_settings() -> tuple:
  """JAX's trace-time settings (x64, default matmul precision, dtype promotion,
  meshes, ...) and Flax's logical axis rules."""
  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from jax._src import config as jax_config
  import flax
  import flax.linen as nn
  from flax.linen import module as linen_module
  return (jax_config.trace_context(), nn.get_logical_axis_rules(),
          str(jax.config.jax_default_prng_impl),
          tuple(getattr(linen_module, "_global_interceptor_stack", None) or ()),
          tuple(sorted(flax.config.__dict__.get("_values", {}).items()))
          if hasattr(flax, "config") else ())


def fingerprint(fn: Any) -> Optional[Fingerprint]:
  """The Python-level `Fingerprint` of what `fn` can read, or None where the walk
  cannot see all of it (see above)."""
  # memo: id -> walked, for objects met twice (or in a cycle); held: what the memo's
  # ids name, alive until the walk ends (a temporary dict's id is reused at once).
  kept, memo, held = [], {}, []

  def identity(obj, tag):
    try:
      kept.append(weakref.ref(obj))
    except TypeError:
      kept.append(obj)
    return (tag, id(obj))

  def walk_class(cls):
    """A class: by identity where it, its bases and its metaclass are a library's;
    else also the attributes of each user's class in its MRO (under a library class
    too: `nn.remat(Block)`) and of a user's metaclass (review h41)."""
    users = [klass for klass in cls.__mro__ if not _library_class(klass)]
    meta = type(cls)
    user_meta = not _is_library(getattr(meta, "__module__", None))
    if not users and not user_meta:
      return identity(cls, "class")
    if id(cls) in memo:
      return memo[id(cls)]
    held.append(cls)
    memo[id(cls)] = ("cycle", id(cls))
    parts = [identity(cls, "class")]
    if user_meta:
      parts.append(("metaclass", walk_class(meta)))
    for klass in users:
      parts.append(tuple((name, walk(value)) for name, value in vars(klass).items()
                         if name not in _CLASS_METADATA))
    memo[id(cls)] = tuple(parts)
    return memo[id(cls)]

  def walk_function(f):
    code = f.__code__
    names = _code_names(code)
    if names & _OPAQUE_NAMES:
      raise _Opaque(f)
    cells = tuple(("empty",) if _empty(cell) else walk(cell.cell_contents)
                  for cell in (f.__closure__ or ()))
    parts = [identity(code, "code"), walk(f.__defaults__), walk(f.__kwdefaults__),
             cells, walk({name: value for name, value in getattr(
                 f, "__dict__", {}).items() if name != "__signature__"})]
    module = f.__globals__.get("__name__")
    if not _is_library(module):
      scope = f.__globals__
      parts.append(tuple((name, walk(scope[name])) for name in sorted(names)
                         if name in scope))
      if any(name in _OPAQUE_NAMES for name in names if name not in scope):
        raise _Opaque(f)
      if any(level or not _is_library(name) for level, name in _imports(code)):
        raise _Opaque(f)  # a user's module imported inside the function (h42)
    return tuple(parts)

  def walk(obj):
    nonlocal budget, depth
    budget -= 1
    if budget < 0 or depth > _MAX_DEPTH:
      raise _Opaque(obj)
    depth += 1
    try:
      return walk_one(obj)
    finally:
      depth -= 1

  def walk_one(obj):
    kind = type(obj)
    if kind in _SCALARS:
      return (kind.__name__, obj)
    if kind in (float, complex):
      return (kind.__name__, repr(obj))  # -0.0 and 0.0 trace to other literals
    if issubclass(kind, jax.Array):
      if issubclass(kind, jax.core.Tracer):
        raise _Opaque(obj)
      return identity(obj, "array")
    if issubclass(kind, np.generic):  # the name: every 1-byte ml_dtype is "<V1"
      return ("scalar", obj.dtype.str, obj.dtype.name, obj.tobytes())
    if issubclass(kind, np.dtype):
      return ("dtype", obj.str, obj.name, str(obj.descr), repr(obj.metadata))
    if issubclass(kind, (types.CodeType, types.GetSetDescriptorType,
                        types.MemberDescriptorType, _TUPLE_GETTER)):  # fixed once made
      return identity(obj, kind.__name__)
    if issubclass(kind, jax.tree_util.PyTreeDef):  # its nodes' static data may be a
      return ("treedef", walk(obj.node_data()),  # user's mutable config (review h43)
              tuple(walk(child) for child in obj.children()))
    if issubclass(kind, type):  # walk_class keeps its own memo (review h41)
      return walk_class(obj)
    if id(obj) in memo:  # met before (shared, or in a cycle): by when first met
      return memo[id(obj)]
    held.append(obj)
    memo[id(obj)] = ("seen", len(held))  # not its id: ids are reused (h42)
    return walk_new(obj, kind)

  def walk_state(obj, kind, base):
    """An instance's own storage beyond `base`'s: its slots (read through their
    descriptors, so private names need no mangling) and its __dict__; opaque for a
    class with storage of its own in C (a defaultdict's factory, a C type)."""
    if base not in kind.__mro__ or not _plain_layout(kind, base):
      raise _Opaque(obj)  # a proxy claiming the base's class, or fields in C
    slots = tuple((name, walk(value.__get__(obj)) if _has_slot(value, obj) else
                   ("unset",))
                  for klass in kind.__mro__[:kind.__mro__.index(base)]
                  for name, value in vars(klass).items()
                  if isinstance(value, types.MemberDescriptorType))
    state = getattr(obj, "__dict__", None) if kind.__dictoffset__ else None
    return (walk_class(kind), slots, () if state is None else walk(dict(state)))

  def walk_new(obj, kind):
    # Containers through their base's own iteration: a subclass's __iter__ or
    # items() may hide entries its other methods read (review h41).
    for base in (tuple, list, set, frozenset):
      if issubclass(kind, base):
        return ("items",) + walk_state(obj, kind, base) + tuple(
            walk(x) for x in base.__iter__(obj))
    for base in (collections.OrderedDict, dict):
      if issubclass(kind, base):  # an OrderedDict's own fields keep its order
        return ("mapping",) + walk_state(obj, kind, base) + tuple(
            (walk(k), walk(v)) for k, v in base.items(obj))
    if kind is types.MappingProxyType:
      return ("mapping",) + tuple((walk(k), walk(v)) for k, v in obj.items())
    for base in (int, float, complex, str, bytes):  # their subclasses
      if issubclass(kind, base):
        return ("value", base.__repr__(obj)) + walk_state(obj, kind, base)
    if issubclass(kind, enum.Enum):  # a member's value and attributes may change
      return ("enum", identity(obj, "member"), walk_class(kind),
              walk(dict(vars(obj))))
    if issubclass(kind, types.ModuleType):
      if _is_library(obj.__name__):
        return ("module", obj.__name__)
      raise _Opaque(obj)
    if kind is types.FunctionType:
      return ("function",) + walk_function(obj)
    if kind is types.MethodType:
      return ("method", walk(obj.__func__), walk(obj.__self__))
    if issubclass(kind, functools.partial):
      return ("partial", walk(obj.func), walk(obj.args), walk(obj.keywords),
              walk_class(kind), walk(dict(getattr(obj, "__dict__", None) or {})))
    if issubclass(kind, (staticmethod, classmethod)):
      return (kind.__name__, walk(obj.__func__))
    if issubclass(kind, property):
      return ("property", walk(obj.fget), walk(obj.fset), walk(obj.fdel))
    if kind is _JIT:  # its own trace cache holds what it reads (h40)
      return ("jit", identity(obj, "jit"), walk(obj.__wrapped__))
    if issubclass(kind, (types.BuiltinFunctionType, types.WrapperDescriptorType,
                        types.MethodDescriptorType, types.MethodWrapperType)):
      owner = getattr(obj, "__self__", None)
      if owner is None or isinstance(owner, types.ModuleType):
        if _is_library(getattr(obj, "__module__", None) or getattr(
            owner, "__name__", None)) or owner is builtins:
          return identity(obj, "builtin")
        raise _Opaque(obj)
      if isinstance(owner, type) and _is_library(owner.__module__):
        return identity(obj, "builtin")  # e.g. tuple.__new__
      return ("bound builtin", walk(owner), obj.__name__)
    return ("object",) + walk_state(obj, kind, object)

  budget, depth = _MAX_NODES, 0
  try:
    key = (walk(fn), walk(_trace_settings()))
  except Exception:  # pylint: disable=broad-except  # _Opaque, or an object whose
    return None      # attributes raise (a proxy): the check traces, as before
  return Fingerprint(key, kept)


@functools.lru_cache(maxsize=1024)
def _plain_layout(kind: type, base: type) -> bool:
  """Whether instances of `kind` store nothing beyond `base`'s storage, their slots,
  __dict__ and __weakref__: the layout of a Python class with the same slots on
  `base`. A C type (or a C subclass, e.g. defaultdict) keeps fields of its own."""
  if kind is base:
    return True
  slots = sum(isinstance(value, types.MemberDescriptorType)
              for klass in kind.__mro__[:kind.__mro__.index(base)]
              for value in vars(klass).values())
  names = tuple(f"slot{i}" for i in range(slots))
  if kind.__dictoffset__ and not base.__dictoffset__:
    names += ("__dict__",)
  if kind.__weakrefoffset__ and not base.__weakrefoffset__:
    names += ("__weakref__",)
  try:
    reference = type("_Reference", (base,), {"__slots__": names})
  except TypeError:  # a variable-size base (tuple, int) takes no __slots__ entries
    if slots:
      return False
    reference = type("_Reference", (base,), {})  # gets a __dict__ where it can
  return (kind.__basicsize__, kind.__itemsize__) == (reference.__basicsize__,
                                                     reference.__itemsize__)


def _has_slot(descriptor, obj) -> bool:
  try:
    descriptor.__get__(obj)
  except AttributeError:
    return False
  return True


def _empty(cell) -> bool:
  try:
    _ = cell.cell_contents
  except ValueError:
    return True
  return False


# owner -> {key: (Fingerprint, value)} after the last `memoized` computation.
_MEMO = weakref.WeakKeyDictionary()


def memoized(owner: Any, key: Hashable, fn: Any, compute: Callable[[], Any]) -> Any:
  """`compute()` (a check that traces `fn`, or a value read from its trace), or the
  value it returned for the same `owner` and `key` while `fn`'s `fingerprint` was
  the same as now: nothing `fn` reads changed, so neither would its trace. An
  exception from `compute` is raised and not remembered. Where the fingerprint was
  None (something it cannot see into, or too large to walk cheaply), later calls
  compute without walking again; a fingerprint that changed while `compute` ran
  (another thread) is not remembered."""
  try:
    table = _MEMO.setdefault(owner, {})
  except TypeError:  # no weak references: computed every time
    return compute()
  record = table.get(key)
  if record is not None and record[0] is None:
    return compute()  # opaque before: the walk would only add its cost
  now = fingerprint(fn)
  if now is not None and record is not None and record[0] == now:
    return record[1]
  value = compute()
  table[key] = (now, value) if now is None or fingerprint(fn) == now else (None, None)
  return value


def raw_key_shape() -> tuple:
  """The shape of `jax.random.PRNGKey(0)` under the default PRNG implementation."""
  return tuple(jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape)


def check_rng(rng, why: str, seed_ok: bool = False) -> None:
  """Refuses an `rng` that is not a JAX random key (typed, or raw uint32[2] under
  the default implementation), nor, with `seed_ok`, an int seed. None passes where
  no seed is taken (a kernel without randomness)."""
  if (rng is None and not seed_ok) or (seed_ok and _checks.is_int(rng)):
    return
  dtype = getattr(rng, "dtype", None)
  raw = raw_key_shape()  # (2,) for threefry, (4,) for rbg (review h40)
  if not (dtype is not None and (jnp.issubdtype(dtype, jax.dtypes.prng_key) or (
      dtype == jnp.uint32 and tuple(np.shape(rng))[-len(raw):] == raw))):
    raise ValueError("rng: expected " + ("an int seed or " if seed_ok else "")
                     + f"a JAX random key (jax.random.key(0)) to {why}, got "
                     f"{type(rng).__name__}.")


def abstract(tree):
  """`tree` as shapes and dtypes (weak types and placements dropped: a weakly typed
  scalar param and its trained, strongly typed value trace alike; review h40)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(tuple(np.shape(x)), jnp.result_type(x))
      if hasattr(x, "dtype") or isinstance(x, (int, float, complex, bool)) else x,
      tree)
