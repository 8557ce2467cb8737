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
"""

import hashlib
import re
import warnings
import weakref
from typing import Any, Callable, Sequence

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
