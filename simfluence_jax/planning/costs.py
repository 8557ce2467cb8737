"""What a compiled program costs per chip: memory, FLOPs and bytes, loops counted.

`compiled.memory_analysis()` gives per-chip buffer sizes as XLA laid them out
(TPU tiles pad small minor dimensions). `compiled.cost_analysis()` counts the body
of a while loop once, whatever its trip count (measured: a `lax.scan` of 8 matmuls
reports the FLOPs of one), so `loop_costs` re-runs XLA's own HLO cost analysis on
every loop body of the optimised module and adds `(trips − 1)` more of it, nested
loops included:

  total(c) = cost(c) + Σ_{loops w in c} (trips(w) · total(body_w) − cost(body_w)).

Trip counts come from XLA's `known_trip_count` when it is annotated, otherwise from
the loop condition `i < N` that `lax.scan` / `fori_loop` lower to (counter from 0).
"""

import dataclasses
import functools
import re
from typing import Any, Dict, List, Optional, Tuple

import jax
from jax._src.lib import _jax  # hlo_module_cost_analysis: XLA's HloCostAnalysis
import jaxlib._hlo as hlo_lib  # hlo_module_from_text
import numpy as np

COST_KEYS = ("flops", "bytes accessed", "transcendentals")
_GIB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-chip bytes of one compiled program (`compiled.memory_analysis()`).

  `total` = arguments + outputs − aliased (donated arguments reused as outputs) +
  temporaries + generated code: what the program holds in HBM at its peak.
  """

  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int

  @property
  def total(self) -> int:
    return (self.arguments + self.outputs - self.aliased + self.temporaries
            + self.code)

  @classmethod
  def of(cls, compiled) -> "Memory":
    stats = compiled.memory_analysis()
    return cls(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
               int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes),
               int(stats.generated_code_size_in_bytes))


def logical_bytes(args: Any) -> int:
  """Per-chip bytes of the array arguments by arithmetic: Σ shard size × itemsize.

  The reference `Memory.arguments` is compared with: equal on CPU, larger on TPU
  by the tile padding of small minor dimensions.
  """
  total = 0
  for leaf in jax.tree_util.tree_leaves(args):
    if not isinstance(leaf, jax.ShapeDtypeStruct):
      continue
    shape = leaf.shape
    if leaf.sharding is not None:
      shape = leaf.sharding.shard_shape(shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


# --- loop-aware cost analysis ---------------------------------------------------------

_HEADER = re.compile(r"^(ENTRY )?%([^\s(]+) \(")
_WHILE = re.compile(r"\swhile\(.*?condition=%([^\s,]+), body=%([^\s,]+)")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLED = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=%"
                     r"([^\s,}]+)|branch_computations=\{([^}]*)\}")
_CONSTANT = re.compile(r"%([^\s]+) = s32\[\]\S* constant\((\d+)\)")
_COMPARE = re.compile(r"ROOT .*compare\(%[^\s,]+, %([^\s,)]+)\), direction=LT")


def _computations(text: str) -> Tuple[Dict[str, List[str]], Optional[str]]:
  """{computation name: its lines}, and the entry's name, of HLO module text."""
  bodies, entry, current = {}, None, None
  for line in text.split("\n"):
    match = _HEADER.match(line)
    if match:
      current = match.group(2)
      bodies[current] = []
      if match.group(1):
        entry = current
    elif current is not None:
      if line.startswith("}"):
        current = None
      else:
        bodies[current].append(line)
  return bodies, entry


def _with_entry(text: str, name: str) -> str:
  """The module text with computation `name` as its entry (header attributes, which
  describe the old entry's layouts and aliasing, dropped)."""
  lines = text.split("\n")
  lines[0] = "HloModule cost_probe"
  for i, line in enumerate(lines):
    if line.startswith("ENTRY %"):
      lines[i] = line[len("ENTRY "):]
    elif line.startswith(f"%{name} ("):
      lines[i] = "ENTRY " + line
  return "\n".join(lines)


def _trip_count(while_line: str, condition: List[str]) -> Optional[int]:
  known = _KNOWN_TRIPS.search(while_line)
  if known:
    return int(known.group(1))
  constants = dict(m.groups() for line in condition for m in [_CONSTANT.search(line)]
                   if m)
  for line in condition:
    compare = _COMPARE.search(line)
    if compare and compare.group(1) in constants:
      return int(constants[compare.group(1)])
  return None


def loop_costs(hlo_text: str, client=None) -> Dict[str, Any]:
  """XLA's cost analysis of optimised HLO with every loop body counted `trips` times.

  Args:
    hlo_text: `compiled.as_text()` (one SPMD partition: the per-chip program).
    client: the XLA client whose cost model sizes shapes (default: the CPU client,
      which reads TPU modules too and sizes shapes without tile padding).

  Returns:
    {"flops", "bytes accessed", "transcendentals": per-chip totals,
     "loops": [(body name, trips or None)], "unknown_trips": bool}.
  """
  client = client or jax.devices("cpu")[0].client
  bodies, entry = _computations(hlo_text)

  @functools.lru_cache(maxsize=None)
  def cost(name: str) -> Tuple[float, ...]:
    module = hlo_lib.hlo_module_from_text(
        hlo_text if name == entry else _with_entry(hlo_text, name))
    analysis = _jax.hlo_module_cost_analysis(client, module)
    return tuple(float(analysis.get(k, 0.0)) for k in COST_KEYS)

  loops, unknown = [], []

  def top_level_whiles(name, seen):
    """Loops of `name` and of what it calls other than through a loop."""
    found = []
    for line in bodies.get(name, ()):
      match = _WHILE.search(line)
      if match:
        found.append((line, match.group(1), match.group(2)))
        continue
      for called in _CALLED.finditer(line):
        names = ([called.group(1)] if called.group(1) else
                 [n.strip().lstrip("%") for n in called.group(2).split(",")])
        for callee in names:
          if callee and callee not in seen:
            seen.add(callee)
            found.extend(top_level_whiles(callee, seen))
    return found

  @functools.lru_cache(maxsize=None)
  def total(name: str) -> Tuple[float, ...]:
    result = list(cost(name))
    for line, condition, body in top_level_whiles(name, {name}):
      trips = _trip_count(line, bodies.get(condition, []))
      loops.append((body, trips))
      if trips is None:
        unknown.append(body)
        continue
      inner, once = total(body), cost(body)
      result = [r + trips * t - o for r, t, o in zip(result, inner, once)]
    return tuple(result)

  totals = total(entry)
  return {**dict(zip(COST_KEYS, totals)), "once": dict(zip(COST_KEYS, cost(entry))),
          "loops": loops, "unknown_trips": bool(unknown)}


def program_costs(compiled, lowered) -> Dict[str, Any]:
  """Per-chip loop-counted costs of a compiled program (`loop_costs`).

  When the optimised module cannot be read back as text (libtpu's XLA can be newer
  than jaxlib's: v5p modules with async collectives fail to parse), XLA's own
  `compiled.cost_analysis()` is scaled by the loop factor of the unoptimised HLO
  (total / once per cost), with `"source"` saying so.
  """
  try:
    return {**loop_costs(compiled.as_text()), "source": "optimised HLO"}
  except Exception:  # pylint: disable=broad-except
    pass
  once = compiled.cost_analysis()
  once = once[0] if isinstance(once, (list, tuple)) else once
  unoptimised = loop_costs(lowered.compiler_ir("hlo").as_hlo_text())
  out = {}
  for key in COST_KEYS:
    base = unoptimised["once"][key]
    factor = unoptimised[key] / base if base else 1.0
    out[key] = float(once.get(key, 0.0)) * factor
  return {**out, "once": {k: float(once.get(k, 0.0)) for k in COST_KEYS},
          "loops": unoptimised["loops"], "unknown_trips": unoptimised["unknown_trips"],
          "source": "compiled cost analysis x loop factor of the unoptimised HLO"}


# --- compile-time out-of-memory ---------------------------------------------------------

_UNITS = {"": 1.0, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_OOM_PATTERNS = (
    # "the total memory required for HLO temporaries (42.00G) exceeds available HBM
    # (15.75G)" (libtpu 0.0.52).
    re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
    # "Ran out of memory in memory space hbm. Used 20.5G of 15.75G hbm." (older).
    re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
)


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return ("RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text
          or "HbmOom" in text)


def oom_bytes(error: BaseException) -> Tuple[Optional[float], Optional[float]]:
  """(bytes needed, bytes available) named by an XLA:TPU out-of-memory error."""
  for pattern in _OOM_PATTERNS:
    match = pattern.search(str(error))
    if match:
      need, need_unit, have, have_unit = match.groups()
      return float(need) * _UNITS[need_unit], float(have) * _UNITS[have_unit]
  return None, None


def gib(value: Optional[float]) -> Optional[float]:
  return None if value is None else value / _GIB
