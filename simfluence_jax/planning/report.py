"""Compiling every stage, checking it fits, searching fixes, and the table.

`plan(config, devices, chip)` compiles every program of every stage the config
runs (`stages.STAGES`), never allocating; a program that runs out of memory or fails
to compile becomes a row saying so, never an exception. For a program that does not
fit, the stage's candidate fixes are recompiled in order and the first that fits is
the row's suggestion.
"""

import concurrent.futures
import copy
import dataclasses
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from simfluence_jax import _checks
from simfluence_jax import models
from simfluence_jax.planning import chips as chips_lib
from simfluence_jax.planning import costs
from simfluence_jax.planning import job as job_lib
from simfluence_jax.planning import stages as stages_lib

_logger = logging.getLogger("simfluence_jax.planning")

FITS, OOM, ERROR, NOT_AVAILABLE = "fits", "out of memory", "error", "not available"
# Sized from its inputs and outputs (a lower bound) instead of compiled; counts as
# fitting when that bound does (`stages.Program.skip`).
NOT_COMPILED = "not compiled"


@dataclasses.dataclass
class Row:
  """One compiled program (or a stage that could not be planned).

  Attributes:
    stage, program: names (`stages.STAGES`, `Program.name`).
    status: FITS, OOM (does not fit: compile-time OOM, or more than the chip's HBM),
      ERROR (failed to build or compile: `error`), NOT_AVAILABLE, NOT_COMPILED
      (sized from inputs and outputs: `error` says why).
    memory: per-chip `costs.Memory`, when it compiled.
    resident_bytes: per-chip bytes the job holds outside the program's arguments
      while it runs (`Program.resident`), counted into `peak_bytes`.
    logical_argument_bytes: per-chip argument bytes by arithmetic (no padding).
    needed_bytes: what an out-of-memory compile said it needed.
    flops, bytes_accessed: per chip per call, loops counted (`costs.loop_costs`).
    roofline_seconds: max(FLOPs / peak, bytes / bandwidth) per call.
    calls: calls per job (None: data-dependent).
    compile_seconds: lowering + compiling.
    measured_seconds: best wall time of a call on zeros (`--measure`, CPU only).
    unknown_loop_trips: a loop whose trip count could not be read (counted once).
    cost_source: which HLO the costs were read from (`costs.program_costs`).
    suggestion: the first fix that fits (or why none was found).
  """

  stage: str
  program: str
  status: str
  note: str = ""
  memory: Optional[costs.Memory] = None
  resident_bytes: int = 0
  logical_argument_bytes: Optional[int] = None
  needed_bytes: Optional[float] = None
  flops: Optional[float] = None
  bytes_accessed: Optional[float] = None
  roofline_seconds: Optional[float] = None
  calls: Optional[int] = None
  compile_seconds: Optional[float] = None
  measured_seconds: Optional[float] = None
  unknown_loop_trips: bool = False
  cost_source: str = ""
  error: str = ""
  suggestion: str = ""

  @property
  def name(self) -> str:
    return f"{self.stage}/{self.program}"

  @property
  def peak_bytes(self) -> Optional[float]:
    """Per-chip bytes at the program's peak: its compiled memory (or, uncompiled,
    what it was sized at) plus what the job holds beside it."""
    own = self.memory.total if self.memory is not None else self.needed_bytes
    return None if own is None else float(own + self.resident_bytes)

  @property
  def job_seconds(self) -> Optional[float]:
    if self.roofline_seconds is None or self.calls is None:
      return None
    return self.roofline_seconds * self.calls

  def to_json(self) -> dict:
    out = {k: v for k, v in dataclasses.asdict(self).items() if k != "memory"}
    out["name"] = self.name
    out["job_seconds"] = self.job_seconds
    out["peak_bytes"] = self.peak_bytes
    if self.memory is not None:
      out["memory"] = {**dataclasses.asdict(self.memory), "total": self.memory.total}
    return out


@dataclasses.dataclass
class Plan:
  """Rows of every stage, and what they were planned for."""

  config_name: str
  topology: str
  chip: chips_lib.ChipSpec
  num_devices: int
  num_params: int
  rows: List[Row]
  seconds: float

  @property
  def fits(self) -> bool:
    """Every row fits (a plan with no rows planned nothing: not "fits")."""
    return bool(self.rows) and not self.failing()

  def failing(self) -> List[Row]:
    return [row for row in self.rows
            if row.status not in (FITS, NOT_AVAILABLE, NOT_COMPILED)]

  def to_json(self) -> dict:
    return {"config": self.config_name, "topology": self.topology,
            "chip": dataclasses.asdict(self.chip), "num_devices": self.num_devices,
            "num_params": self.num_params, "fits": self.fits,
            "seconds": self.seconds, "rows": [row.to_json() for row in self.rows]}


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  for line in text.splitlines():
    if line.strip():
      return f"{type(error).__name__}: {line.strip()[:300]}"
  return type(error).__name__


def _zeros(args):
  """Concrete zeros of `ShapeDtypeStruct` leaves, placed with their shardings."""
  def leaf(x):
    if not isinstance(x, jax.ShapeDtypeStruct):
      return x
    value = np.zeros(x.shape, x.dtype)
    return jax.device_put(value, x.sharding) if x.sharding is not None else value
  return jax.tree_util.tree_map(leaf, args)


def _measure(compiled, program: stages_lib.Program, repeats: int = 3) -> float:
  """Best wall time of `repeats` calls (after one warm-up) on fresh zeros."""
  best = float("inf")
  for i in range(repeats + 1):
    args = jax.block_until_ready(_zeros(program.args))
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    if i:
      best = min(best, time.perf_counter() - start)
  return best


def compile_row(stage: str, program: stages_lib.Program, chip: chips_lib.ChipSpec,
                measure: bool = False) -> Row:
  """Lowers and compiles one program; its row (never raises for a compile error)."""
  row = Row(stage, program.name, ERROR, note=program.note, calls=program.calls,
            logical_argument_bytes=costs.logical_bytes(program.args),
            resident_bytes=costs.logical_bytes(program.resident))
  if program.skip:
    outputs = jax.eval_shape(program.fn, *program.args, **program.static)
    row.needed_bytes = float(row.logical_argument_bytes
                             + costs.logical_bytes(outputs))
    row.status = NOT_COMPILED if row.peak_bytes <= chip.hbm_bytes else OOM
    row.error = program.skip
    return row
  if row.logical_argument_bytes + row.resident_bytes > chip.hbm_bytes:
    # Nothing to learn from compiling (minutes for a large model): it cannot fit.
    row.status, row.needed_bytes = OOM, float(row.logical_argument_bytes)
    beside = (f" with {costs.gib(row.resident_bytes):.1f} GiB the job holds beside "
              "them" if row.resident_bytes else "")
    row.error = (f"its arguments alone are {costs.gib(row.needed_bytes):.1f} GiB per "
                 f"chip{beside} (> {costs.gib(chip.hbm_bytes):.2f} GiB HBM); not "
                 "compiled")
    return row
  start = time.perf_counter()
  try:
    lowered = program.lower()
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    row.compile_seconds = time.perf_counter() - start
    if costs.is_out_of_memory(e):
      row.status = OOM
      row.needed_bytes = costs.oom_bytes(e)[0]
    row.error = _first_line(e)
    return row
  row.compile_seconds = time.perf_counter() - start
  try:
    row.memory = costs.Memory.of(compiled)
    row.status = FITS if row.peak_bytes <= chip.hbm_bytes else OOM
    counted = costs.program_costs(compiled, lowered)
    row.flops, row.bytes_accessed = counted["flops"], counted["bytes accessed"]
    row.unknown_loop_trips = counted["unknown_trips"]
    row.cost_source = counted["source"]
    if program.min_flops > row.flops:  # work the cost model cannot see (eigh)
      row.flops = program.min_flops
      row.cost_source += "; FLOPs from the shape estimate (see the row's note)"
    row.roofline_seconds = chip.roofline_seconds(row.flops, row.bytes_accessed)
    if measure:
      row.measured_seconds = _measure(compiled, program)
  except Exception as e:  # pylint: disable=broad-except
    row.error = f"compiled, but its analysis failed: {_first_line(e)}"
  return row


def _compile_logged(stage: str, program: stages_lib.Program, chip: chips_lib.ChipSpec,
                    measure: bool) -> Row:
  """`compile_row`, logged when it starts and as soon as its memory is known (so a
  plan stopped during a later, long compile still leaves every finished row's
  numbers in the log)."""
  _logger.info("plan: compiling %s/%s", stage, program.name)
  row = compile_row(stage, program, chip, measure=measure)
  needed = row.peak_bytes
  _logger.info("plan: %s/%s: %s%s (compile %s)", stage, program.name, row.status,
               "" if needed is None else f", {costs.gib(needed):.3g} GiB per chip",
               _seconds(row.compile_seconds))
  return row


def override(config, overrides: Dict[str, Any]):
  """A copy of `config` with dotted fields set."""
  changed = copy.deepcopy(config)
  with changed.unlocked():
    for field, value in overrides.items():
      *parents, leaf = field.split(".")
      section = changed
      for part in parents:
        section = section[part]
      section[leaf] = value
  return changed


def suggest(stage: stages_lib.Stage, job: job_lib.Job, failing: Row,
            chip: chips_lib.ChipSpec) -> str:
  """The first of the stage's fixes under which program `failing.program` fits.

  Fixes are tried cheapest first. A lever (the fixes setting the same config
  fields) is given up only when a fix of a strictly smaller `Fix.setting` than one
  of it already tried left the memory (nearly) unchanged: it does not move what
  fills the chip. A setting whose memory rose says nothing about smaller ones.
  """
  tried, dead, last = [], set(), {}  # last: lever -> (setting, peak) tried
  try:
    fixes = stage.fixes(job)
  except Exception as e:  # pylint: disable=broad-except
    return f"no suggestion: its fixes could not be listed ({_first_line(e)})"
  for fix in fixes:
    fields = frozenset(fix.overrides)
    if fields in dead:
      continue
    try:
      candidate = job_lib.build(override(job.config, fix.overrides), list(job.devices))
      program = next(p for p in stage.build(candidate) if p.name == failing.program)
    except Exception as e:  # pylint: disable=broad-except
      _logger.info("plan: fix %s of %s not built: %s", fix.label, failing.name, e)
      continue
    row = compile_row(stage.name, program, chip)
    _logger.info("plan: %s with %s: %s", failing.name, fix.label, row.status)
    if row.status == FITS:
      return (f"fits with {fix.label}: {costs.gib(row.peak_bytes):.2f} GiB per "
              "chip")
    after = row.peak_bytes
    tried.append(fix.label + ("" if after is None else
                              f" needs {costs.gib(after):.1f} GiB"))
    if fix.setting is None or after is None:
      continue
    setting, before = last.get(fields, (None, None))
    if (setting is not None and fix.setting < setting
        and after > 0.95 * before):
      dead.add(fields)
    last[fields] = (fix.setting, after)
  if tried:
    return "no candidate fits (tried: " + "; ".join(tried) + ")"
  return "no config candidate for this stage"


def plan(config, devices: Sequence[jax.Device], chip: chips_lib.ChipSpec, *,
         topology: str = "", config_name: str = "",
         stage_names: Optional[Sequence[str]] = None, find_fixes: bool = True,
         measure: bool = False, compile_threads: Optional[int] = None) -> Plan:
  """Compiles every stage of the job of `config` for `devices`.

  Args:
    config: the experiment config (validated by the caller).
    devices: the job's devices (`devices.topology_devices`).
    chip: their spec (HBM, peak, bandwidth).
    topology, config_name: labels for the report.
    stage_names: plan only these stages (default: every stage the config runs).
    find_fixes: recompile the fixes of a program that does not fit.
    measure: also run every program on zeros (only for local devices).
    compile_threads: programs compiled at once (XLA's compilers run mostly on one
      core and release the GIL; a program's compile time is then its wall time
      among the others). None = 1: each compile of a large program holds several
      GiB of host memory, and 2 threads ran the 8B plan out of a 24 GiB machine's.
      Always 1 with `measure` (timings).

  Returns:
    A `Plan`.

  Raises:
    ValueError: a config the plan cannot size (named field), or an unknown stage
      or one this config does not run in `stage_names`.
  """
  start = time.perf_counter()
  job = job_lib.build(config, list(devices))
  wanted = [stages_lib.get(name) for name in stage_names] if stage_names else list(
      stages_lib.STAGES)
  for stage in wanted:
    if stage_names and not stage.applies(job):
      runs = [s.name for s in stages_lib.STAGES if s.applies(job)]
      raise ValueError(f"--stages: {stage.name!r} is not run by this config (it "
                       f"runs {', '.join(runs)}).")
  if compile_threads is not None and (not _checks.is_int(compile_threads)
                                      or compile_threads < 1):
    raise ValueError(f"--compile_threads={compile_threads!r}: must be a positive "
                     "integer.")
  compile_threads = 1 if measure or compile_threads is None else compile_threads
  entries = []  # per row, in stage order: a finished Row, or (stage, future)
  with concurrent.futures.ThreadPoolExecutor(max(1, compile_threads)) as pool:
    for stage in wanted:
      if not stage.applies(job):
        continue
      try:
        programs = stage.build(job)
      except stages_lib.NotAvailable as e:
        entries.append(Row(stage.name, "-", NOT_AVAILABLE, error=str(e)))
        continue
      except Exception as e:  # pylint: disable=broad-except
        entries.append(Row(stage.name, "-", ERROR, error=_first_line(e)))
        continue
      for program in programs:
        future = pool.submit(_compile_logged, stage.name, program, chip, measure)
        entries.append((stage, future))
    rows = []
    for entry in entries:
      if isinstance(entry, Row):
        rows.append(entry)
        continue
      stage, future = entry
      row = future.result()
      if row.status == OOM and find_fixes:
        row.suggestion = suggest(stage, job, row, chip)
      rows.append(row)
  return Plan(config_name=config_name, topology=topology, chip=chip,
              num_devices=len(devices), num_params=models.num_params(job.params),
              rows=rows, seconds=time.perf_counter() - start)


# --- formatting ------------------------------------------------------------------------


def _fmt(value: Optional[float], spec: str = ".2f", scale: float = 1.0) -> str:
  return "-" if value is None else format(value / scale, spec)


def _seconds(value: Optional[float]) -> str:
  if value is None:
    return "-"
  if value < 1e-3:
    return f"{value * 1e6:.0f}us"
  if value < 1.0:
    return f"{value * 1e3:.1f}ms"
  return f"{value:.1f}s"


COLUMNS = ("stage/program", "args GiB", "temps GiB", "out GiB", "total GiB",
           "fits", "GFLOP", "GB accessed", "roofline", "calls", "job time",
           "compile")


def table_rows(result: Plan) -> List[List[str]]:
  gib = float(1 << 30)
  out = []
  for row in result.rows:
    memory, total = row.memory, row.peak_bytes
    fits = {FITS: "yes", OOM: "NO", ERROR: "error", NOT_AVAILABLE: "n/a",
            NOT_COMPILED: "yes*"}[row.status]
    out.append([
        row.name,
        _fmt(memory and memory.arguments, ".3g", gib),
        _fmt(memory and memory.temporaries, ".3g", gib),
        _fmt(memory and memory.outputs, ".3g", gib),
        ("≥" if memory is None and total else "") + _fmt(total, ".3g", gib),
        fits, _fmt(row.flops, ".3g", 1e9), _fmt(row.bytes_accessed, ".3g", 1e9),
        _seconds(row.roofline_seconds),
        "per iter" if row.calls is None and row.memory else str(row.calls or "-"),
        _seconds(row.job_seconds), _seconds(row.compile_seconds)])
  return out


def header(result: Plan) -> str:
  chip = result.chip
  shared = (f" ({chip.devices_per_chip} per chip)" if chip.devices_per_chip > 1
            else "")
  hbm_source = f" ({chip.hbm_source})" if chip.hbm_source else ""
  return (f"plan of {result.config_name or 'config'} on {result.topology} "
          f"({result.num_devices} x {chip.name}{shared}: "
          f"{chip.hbm_bytes / 2**30:.2f} GiB HBM{hbm_source}, "
          f"{chip.peak_flops / 1e12:.3g} TFLOP/s, "
          f"{chip.hbm_bandwidth / 1e9:.0f} GB/s; {chip.source}); "
          f"model {result.num_params / 1e6:.2f}M params; "
          f"planned in {result.seconds:.0f}s")


def notes(result: Plan) -> List[str]:
  lines = []
  for row in result.rows:
    if row.note:
      lines.append(f"{row.name}: {row.note}")
    if row.error:
      lines.append(f"{row.name}: {row.error}")
    if row.suggestion:
      lines.append(f"{row.name} does not fit: {row.suggestion}")
    if row.cost_source and row.cost_source != "optimised HLO":
      lines.append(f"{row.name}: costs from the {row.cost_source}")
    if row.unknown_loop_trips:
      lines.append(f"{row.name}: a loop's trip count is unknown; its body is "
                   "counted once")
    if row.measured_seconds is not None:
      lines.append(f"{row.name}: measured {_seconds(row.measured_seconds)} per call "
                   f"vs roofline {_seconds(row.roofline_seconds)}")
  return lines


def format_text(result: Plan) -> str:
  rows = [list(COLUMNS)] + table_rows(result)
  widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
  lines = [header(result), ""]
  for i, r in enumerate(rows):
    lines.append("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w)
                           for j, (cell, w) in enumerate(zip(r, widths))))
    if i == 0:
      lines.append("  ".join("-" * w for w in widths))
  lines.append("")
  lines += notes(result)
  lines.append("")
  failing = result.failing()
  if not result.rows:
    lines.append("NOTHING PLANNED: no stage to compile")
    return "\n".join(lines)
  lines.append("FITS" if not failing else "DOES NOT FIT: " + ", ".join(
      r.name + (" (failed to compile)" if r.status == ERROR else "")
      for r in failing))
  return "\n".join(lines)


def format_markdown(result: Plan) -> str:
  lines = [header(result), "", "| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS)))
           + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
  extra = notes(result)
  if extra:
    lines += [""] + [f"- {line}" for line in extra]
  return "\n".join(lines)


def write_json(result: Plan, path: str) -> None:
  from simfluence_jax import _io  # pylint: disable=g-import-not-at-top
  _io.write_text(path, json.dumps(result.to_json(), indent=2))


def _count(number: float) -> str:
  """1.34e9 -> "1.34B", 2.55e7 -> "25.5M", 1.36e5 -> "136k"."""
  for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if number >= scale:
      return f"{number / scale:.3g}{suffix}"
  return f"{number:.0f}"


def plans_table(plans: List[dict]) -> List[str]:
  """Markdown rows of every stage: its programs' largest peak GiB per chip in each plan
  (`Plan.to_json` dicts; "–": the config does not run it), "NO" where it does not
  fit, and a header naming each plan's config, topology and chips."""
  stages, cells = [], []
  for plan in plans:
    by_stage = {}
    for row in plan["rows"]:
      stage = row["name"].split("/")[0]
      if stage not in stages:
        stages.append(stage)
      total = row.get("peak_bytes", (row.get("memory") or {}).get("total")
                      or row.get("needed_bytes"))  # plans saved before peak_bytes
      old_total, old_status, bound = by_stage.get(stage, (None, FITS, False))
      if total is not None and (old_total is None or total > old_total):
        # A program sized, not compiled: its inputs and outputs, a lower bound.
        old_total, bound = total, row["status"] == NOT_COMPILED
      # The worst status of the stage's programs: does not fit, then error.
      status = next((s for s in (OOM, ERROR) if s in (row["status"], old_status)),
                    FITS)
      by_stage[stage] = (old_total, status, bound)
    cells.append(by_stage)
  header = ["| stage | " + " | ".join(
      f"`{os.path.basename(p['config'])}` on {p['topology']} ({p['num_devices']} x "
      f"{p['chip']['hbm_bytes'] / 2**30:.4g} GiB, {_count(p['num_params'])} params)"
      for p in plans) + " |", "|---" * (len(plans) + 1) + "|"]
  lines = []
  for stage in stages:
    values = []
    for by_stage in cells:
      if stage not in by_stage:
        values.append("–")
        continue
      total, status, bound = by_stage[stage]
      text = ("n/a" if total is None else
              ("≥" if bound else "") + f"{total / 2**30:.2f}")
      values.append({OOM: f"**{text} NO**", ERROR: f"{text} (error)"}.get(status,
                                                                            text))
    lines.append(f"| {stage} | " + " | ".join(values) + " |")
  return header + lines + [
      "", "GiB per chip at each stage's largest peak (XLA's memory analysis of the "
      "compiled TPU program, plus what the job holds beside it, e.g. EK-FAC factors; "
      "≥: a lower bound, the inputs and outputs of a program not compiled, e.g. "
      "large eigendecompositions, or the Simfluence fit of a multi-host job, which "
      "runs on each host's CPU; n/a: not available); **NO**: does not fit the chip's "
      "HBM; (error): a program failed "
      "to compile (see the plan's notes). Planned in " + ", ".join(
          f"{p['seconds'] / 60:.1f} min" for p in plans) + " on this 2-core machine."]
