r"""A grid of main jobs: where attribution works, and where no method does.

  python -m simfluence_jax.sweep --config=configs/default.py:tiny --workdir=/tmp/map \
      --sweep=batch_size:8,32 --sweep=learning_rate:0.001,0.003

Every cell of the grid is a full main job (`pipeline.run`) in `WORKDIR/<cell>/`
(e.g. `batch_size=8,learning_rate=0.001/`), so a sweep resumes cell by cell and a
rerun reuses finished cells. Writes `WORKDIR/sweep.json`, a list of
`{"overrides": {...}, "metrics": {method: {metric: value}}, "regime": {...},
"workdir": "<cell>", "metrics_digest": ...}` (the cell's mean test-loss drop and
across-run std of final losses; the digest of the cell's metrics.json when the sweep
wrote sweep.json, which `tables --sweep` compares with the cell's metrics.json now:
a cell rerun alone since is refused), and `WORKDIR/sweep.png`: heat maps (2 swept
fields), lines (1) or bars (more) of every method's spearman_across_runs and
all_steps_mse ratio to curriculum_blind (with `config.num_seeds` > 1, the ratio of
the cell's mean MSEs over seeds), for the methods of any cell.

Values are typed like the field: an empty value (`model.checkpoint:,/ckpt`) is the
empty string of a string field and refused for any other; two values that parse
equal (`learning_rate:1e-3,0.001`) are refused (they would be one cell run twice).

A swept field is set in each cell's copy of the config and must read back as given:
a field that is a reference to another (`config.data.seed` is `config.seed`) is
refused, naming the field to sweep instead, and so is a cell whose overrides do not
all read back (two tied fields).
"""

import copy
import itertools
import json
import os
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
from ml_collections import config_dict
import numpy as np

from simfluence_jax import _io
from simfluence_jax import main as main_lib
from simfluence_jax import sharding

_SWEEP = flags.DEFINE_multi_string(
    "sweep", [], "FIELD:V1,V2,... (dotted config field and its values); repeat the "
    "flag for a grid over several fields.")

PLOTTED = ("spearman_across_runs", "all_steps_mse_ratio")


def _field_value(config, field: str):
  section = config
  for part in field.split("."):
    if part not in section:
      raise ValueError(f"--sweep={field}: config has no field {field!r}.")
    section = section[part]
  return section


def _leaves(config, prefix: str = ""):
  """(dotted name, stored value) of every leaf; a reference stays a FieldReference."""
  for key, value in config.items(preserve_field_references=True):
    if isinstance(value, config_dict.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _reference(config, field: str):
  """The FieldReference stored at `field`, or None if it holds a plain value."""
  *parents, leaf = field.split(".")
  section = config
  for part in parents:
    section = section[part]
  value = dict(section.items(preserve_field_references=True))[leaf]
  return value if isinstance(value, config_dict.FieldReference) else None


def _tied_to(config, field: str):
  """The field `field` is a reference to (`data.seed` -> `seed`), or None.

  Fields holding the same FieldReference are one value: setting one sets all. The
  one with the fewest dots (the section's own field, e.g. top-level `seed`) is the
  field to sweep; the others are tied to it.
  """
  reference = _reference(config, field)
  if reference is None:
    return None
  names = [name for name, value in _leaves(config) if value is reference]
  owner = min(names, key=lambda name: (name.count("."), names.index(name)))
  return None if owner == field else owner


def _article(noun: str) -> str:
  return "an" if noun[:1].lower() in "aeiou" else "a"


def _convert(field: str, text: str, default: Any, kind: type = None):
  """`text` as the type of the config field's current value (of `kind`, a
  placeholder's declared type, where that value is None); "" is a string field's
  empty string, refused for any other type."""
  kind = type(default) if default is not None or kind is None else kind
  if kind in (type(None), object):
    kind = float
  if not text and not issubclass(kind, str):
    raise ValueError(f"--sweep={field}:...: an empty value is not "
                     f"{_article(kind.__name__)} {kind.__name__}.")
  try:
    if issubclass(kind, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    if issubclass(kind, int):
      return int(text)
    if issubclass(kind, float):
      return float(text)
    return kind(text)
  except ValueError as e:
    raise ValueError(f"--sweep={field}:...: {text!r} is not "
                     f"{_article(kind.__name__)} {kind.__name__}.") from e


# Fields the process applies once, before the sweep (`main.run_main`): a cell's
# value would never be used (review h28: no cell's cache directory was made).
PROCESS_FIELDS = ("distributed", "compilation_cache_dir")


def parse_sweeps(specs: Sequence[str], config) -> list[tuple[str, list]]:
  """`["batch_size:8,32"]` -> `[("batch_size", [8, 32])]`, values typed like the
  config's field (a placeholder's by its declared type: `influence.query_rank:4`
  is an int).

  Raises:
    ValueError: a malformed spec, an unknown field, a value of the wrong type (an
      empty one for a field that is not a string), two values that parse equal
      (one cell twice), a field that is a reference to another (sweep that one).
  """
  if not specs:
    raise ValueError("--sweep: give at least one FIELD:V1,V2,...")
  grid = []
  for spec in specs:
    field, sep, values = spec.partition(":")
    if not sep or not field or not values.strip(","):
      raise ValueError(f"--sweep={spec!r}: expected FIELD:V1,V2,...")
    default = _field_value(config, field)
    if isinstance(default, (dict, tuple, list)) or hasattr(default, "keys"):
      raise ValueError(f"--sweep={spec!r}: {field} is not a scalar field.")
    if field in PROCESS_FIELDS:
      raise ValueError(f"--sweep={field}: set once per process, before any cell runs "
                       f"(every cell would run with the first); pass "
                       f"--config.{field} instead.")
    owner = _tied_to(config, field)
    if owner is not None:
      raise ValueError(f"--sweep={field}: tied to config.{owner} (a reference); "
                       f"sweep {owner} instead.")
    reference = _reference(config, field)
    kind = reference.get_type() if reference is not None else None
    texts = [v.strip() for v in values.split(",")]
    parsed = [_convert(field, text, default, kind) for text in texts]
    for j, value in enumerate(parsed):
      for i in range(j):
        if _reads_back(parsed[i], value) or str(parsed[i]) == str(value):
          raise ValueError(f"--sweep={field}:...: {texts[i]!r} and {texts[j]!r} are "
                           f"the same value ({value!r}): each value is one cell.")
    grid.append((field, parsed))
  fields = [f for f, _ in grid]
  if len(set(fields)) != len(fields):
    raise ValueError(f"--sweep: a field is given twice ({fields}).")
  return grid


def cell_name(overrides: dict) -> str:
  """`field=value,...`: how a cell is shown."""
  return ",".join(f"{k}={v}" for k, v in overrides.items())


def _folder_name(overrides: dict) -> str:
  return cell_name(overrides).replace("%", "%25").replace("/", "%2F")


def cell_folder(overrides: dict, workdir=None) -> str:
  """The cell's folder in the sweep's workdir: `cell_name` of the fields in sorted
  order, so the order of the --sweep flags does not matter, with "%" and "/"
  escaped as in URLs ("%25", "%2F"), so that a value holding a path
  (`model.checkpoint`) or a dataset name ("glue/sst2") neither nests one cell's
  folder in another's nor leaves the sweep's workdir.

  Given the sweep's `workdir`, a folder of the same cell named in another field
  order (the flags' order, before 2026-12-07) is reused where it exists (review
  h30: reversing two flags retrained every cell beside the finished ones).
  """
  name = _folder_name(dict(sorted(overrides.items())))
  if workdir is None or len(overrides) > 4 or _io.exists(
      os.path.join(os.fspath(workdir), name)):
    return name
  for order in itertools.permutations(overrides):
    other = _folder_name({field: overrides[field] for field in order})
    if _io.exists(os.path.join(os.fspath(workdir), other)):
      return other
  return name


def _reads_back(got: Any, value: Any) -> bool:
  if isinstance(value, float) and np.isnan(value):
    return isinstance(got, float) and bool(np.isnan(got))
  return got == value and isinstance(got, bool) == isinstance(value, bool)


def cell_config(config, overrides: dict):
  """A copy of `config` with `overrides` set.

  Raises:
    ValueError: a value the field does not take, or an override that does not read
      back as given once every earlier one is set (two fields tied by a reference:
      the cell would silently run other settings than its name says).
  """
  cell = copy.deepcopy(config)
  with cell.unlocked():
    for index, (field, value) in enumerate(overrides.items()):
      *parents, leaf = field.split(".")
      section = cell
      for part in parents:
        section = section[part]
      try:
        section[leaf] = value
      except TypeError as e:
        raise ValueError(f"--sweep={field}: the field does not take {value!r} "
                         f"({e}).") from e
      for earlier, wanted in list(overrides.items())[:index + 1]:
        got = _field_value(cell, earlier)
        if _reads_back(got, wanted):
          continue
        if earlier == field:
          raise ValueError(f"--sweep={field}: set to {value!r}, it reads back "
                           f"{got!r} (cell {cell_name(overrides)}).")
        raise ValueError(f"--sweep={field}: setting it to {value!r} set "
                         f"{earlier}={got!r}, not {wanted!r} (cell "
                         f"{cell_name(overrides)}): the two are tied; sweep one "
                         "of them.")
  return cell


def _method_metrics(payload: dict, part: dict = None) -> dict:
  """`{method: {metric: number}}` of `part` (default `payload`: the means; or
  `payload["std"]`), for the methods of `payload`."""
  from simfluence_jax.evaluation import _report  # pylint: disable=g-import-not-at-top
  part = payload if part is None else part
  return {m: {k: v for k, v in part[m].items() if isinstance(v, (int, float))}
          for m in _report.methods_of(payload) if m in part}


def run(config, workdir: str, specs: Sequence[str], overwrite: bool = False,
        run_fn=None) -> list:
  """Runs every cell (main jobs), writes sweep.json and sweep.png; returns the list."""
  from simfluence_jax import pipeline  # pylint: disable=g-import-not-at-top
  from simfluence_jax.evaluation import _report  # pylint: disable=g-import-not-at-top
  from simfluence_jax.evaluation import _tables  # pylint: disable=g-import-not-at-top
  run_fn = run_fn or pipeline.run
  grid = parse_sweeps(specs, config)
  cells = [dict(zip([f for f, _ in grid], values))
           for values in itertools.product(*[v for _, v in grid])]
  for overrides in cells:  # every cell validates before any runs
    pipeline.validate_config(cell_config(config, overrides))
    size = len(cell_folder(overrides).encode())
    if size > 255:  # most filesystems' limit on a name
      raise ValueError(f"--sweep: cell {cell_name(overrides)!r} names a folder of "
                       f"{size} bytes, over the 255 a filesystem takes; sweep "
                       "shorter values.")
  # The last sweep's results go first: a sweep that stops before the end leaves none
  # that reads as current (`tables --sweep` refuses a missing sweep.json).
  if sharding.is_primary():
    for name in ("sweep.json", "sweep.png"):
      _io.remove_tree(os.path.join(os.fspath(workdir), name))
  results = []
  for index, overrides in enumerate(cells):
    print(f"sweep: cell {index + 1}/{len(cells)}: {cell_name(overrides)}",
          file=sys.stderr, flush=True)
    folder = cell_folder(overrides, workdir)
    cell_dir = os.path.join(os.fspath(workdir), folder)
    # A cell is a workdir of its own (rerun alone): its lock keeps such a job and
    # this sweep from writing it at once.
    with pipeline.workdir_lock(cell_dir):
      payload = run_fn(cell_config(config, overrides), cell_dir, overwrite)
    cell = {"overrides": overrides, "metrics": _method_metrics(payload),
            "regime": payload.get("regime")}
    if "std" in payload:  # config.num_seeds > 1: the metrics are means over seeds
      cell.update(std=_method_metrics(payload, payload["std"]),
                  seeds=payload.get("seeds"))
    # What the cell's metrics.json held when these numbers were taken from it:
    # `tables --sweep` refuses a cell rerun alone since (None: no metrics.json here,
    # nothing to check).
    cell.update(workdir=folder,
                metrics_digest=_tables.metrics_digest(cell_dir))
    results.append(cell)
  if sharding.is_primary():
    _io.write_text(os.path.join(os.fspath(workdir), "sweep.json"),
                   json.dumps(_report.clean_json(results), indent=2))
    plot(os.path.join(os.fspath(workdir), "sweep.png"), grid, results)
  return results


def plotted_methods(results: list) -> list:
  """The methods of `plot`'s panels: those of every cell holding a `PLOTTED` metric,
  in order of first appearance (a cell lacking one is NaN in its panels), but
  curriculum_blind (no ρ across runs, its own MSE ratio 1: two empty panels)."""
  methods = []
  for result in results:
    methods += [m for m, values in result["metrics"].items() if m not in methods
                and m != "curriculum_blind" and any(k in values for k in PLOTTED)]
  return methods


def _text_colour(cmap, norm, value) -> str:
  """Black on light cells, white on dark ones (the label must read on both ends of
  viridis)."""
  if not np.isfinite(value):
    return "k"
  red, green, blue, _ = cmap(norm(value))
  return "k" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "w"


def plot(path: str, grid: list, results: list) -> None:
  """Heat maps (two swept fields), lines (one) or bars (more), per method and metric."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  methods = plotted_methods(results)
  fig, axes = plt.subplots(len(PLOTTED), len(methods),
                           figsize=(2.8 * len(methods), 2.6 * len(PLOTTED)),
                           squeeze=False)
  value = lambda r, m, k: r["metrics"].get(m, {}).get(k, np.nan)
  for row, metric in enumerate(PLOTTED):
    for col, method in enumerate(methods):
      ax = axes[row, col]
      values = np.array([np.nan if value(r, method, metric) is None
                         else value(r, method, metric) for r in results], float)
      if len(grid) == 2:
        (f0, v0), (f1, v1) = grid
        table = values.reshape(len(v0), len(v1))
        # ρ on its whole range [-1, 1] (clamped at 0, every negative ρ was one
        # colour); the MSE ratio on the panel's own range, low = good = light.
        rho = metric.startswith("spearman")
        image = ax.imshow(table, cmap="viridis" if rho else "viridis_r",
                          aspect="auto", vmin=-1 if rho else None,
                          vmax=1 if rho else None)
        for i in range(len(v0)):
          for j in range(len(v1)):
            ax.text(j, i, f"{table[i, j]:.2f}", ha="center", va="center",
                    color=_text_colour(image.cmap, image.norm, table[i, j]),
                    fontsize=8)
        ax.set_xticks(range(len(v1)), [str(v) for v in v1], fontsize=7)
        ax.set_yticks(range(len(v0)), [str(v) for v in v0], fontsize=7)
        ax.set_xlabel(f1, fontsize=7)
        ax.set_ylabel(f0, fontsize=7)
      elif len(grid) == 1:
        ax.plot(range(len(values)), values, "o-")
        ax.set_xticks(range(len(values)), [str(v) for v in grid[0][1]], fontsize=7)
        ax.set_xlabel(grid[0][0], fontsize=7)
      else:
        ax.bar(range(len(values)), values)
        ax.set_xticks(range(len(values)), [cell_name(r["overrides"]) for r in results],
                      rotation=90, fontsize=5)
      if metric.endswith("ratio"):
        ax.set_title(f"{method}\nMSE / blind", fontsize=8)
      else:
        ax.set_title(f"{method}\n{metric}", fontsize=8)
  fig.tight_layout()
  _io.save_figure(fig, path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")

  def run_grid(config, workdir, overwrite):
    run(config, workdir, _SWEEP.value, overwrite)

  main_lib.run_main(run_grid)


if __name__ == "__main__":
  app.run(main, flags_parser=main_lib.parse_flags)
