"""What each stage of the main job was computed from: reuse, recompute, or refuse.

Every stage of the pipeline declares the config fields it reads (dotted names or
section prefixes such as `"model"`) and the stages whose outputs it takes. Its
*fingerprint* is a hash of

* the values of those fields, and of every field its upstream stages read
  (so a record names the config fields that shaped it, directly or not);
* the fingerprints of its upstream stages;
* a per-stage code version (bumped when a stage changes what it computes).

The fingerprint is stored with the stage's outputs as `workdir/stages/<stage>.json`,
written when the stage *starts* (status "running") and again when it is *done*. On a
rerun:

* record done with the same fingerprint → the stored outputs are reused;
* record with the same fingerprint but not done (a killed job) → the stage runs
  again; training resumes from its own checkpoints;
* record with another fingerprint → the stage is recomputed, unless it is
  *precious* (training runs, whose checkpoints a recompute would discard): then the
  job refuses with one line naming the changed fields, or, with `overwrite`, deletes
  the old outputs first.

A stage never reuses outputs whose inputs differ: this module is the one place that
decides, and `tests/pipeline_test.py` checks every config field is read by some stage
or declared as shaping nothing stored (`UNCACHED_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable, Mapping, Optional, Sequence

import ml_collections
import numpy as np

# Config fields that change no stored output (how the job runs, not what it
# computes); every other field must be read by at least one stage.
# `mesh_model` and `influence.mesh_model` place the same computation on other
# devices, `metagradient.cotangents_at_once` batches the same reverse passes and
# `compile_optimizations` compiles the same programs with fewer XLA passes (results
# equal up to float rounding, as with the device count).
UNCACHED_FIELDS = ("distributed", "num_seeds", "compilation_cache_dir",
                   "compile_optimizations", "mesh_model", "influence.mesh_model",
                   "metagradient.cotangents_at_once")


# Fields added after workdirs existed, with the value that means what the code did
# before them: a field at that value is left out of every record, so older workdirs
# still match (a new field would otherwise make every precious stage refuse them);
# any other value is recorded like every field.
FIELDS_ADDED_LATER = {"model.use_bias": True, "warmup_steps": 0,
                      "end_learning_rate": 0.0, "momentum": 0.9, "b1": 0.9,
                      "b2": 0.999, "eps": 1e-8}


class StaleWorkdirError(ValueError):
  """A precious stage's stored outputs were computed from other inputs."""


def flatten_config(config: Any, prefix: str = "") -> dict:
  """`{dotted name: value}` of every leaf of a ConfigDict / dict (tuples as lists)."""
  out = {}
  items = config.items() if hasattr(config, "items") else dict(config).items()
  for key, value in items:
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten_config(value, name + "."))
    else:
      out[name] = _plain(value)
  return out


def _plain(value: Any) -> Any:
  """A JSON-comparable form of a config value."""
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  return repr(value)


def select_fields(flat: Mapping[str, Any], fields: Iterable[str]) -> dict:
  """The entries of `flat` named by `fields` (a field or a section prefix).

  A field of `FIELDS_ADDED_LATER` at its old-behaviour value is left out.

  Raises:
    KeyError: a declared field names nothing in the config (a typo in a stage).
  """
  out = {}
  for field in fields:
    matched = {k: v for k, v in flat.items()
               if k == field or k.startswith(field + ".")}
    if not matched:
      raise KeyError(f"stage field {field!r} is not a config field.")
    out.update(matched)
  return dict(sorted((k, v) for k, v in out.items()
                     if k not in FIELDS_ADDED_LATER or v != FIELDS_ADDED_LATER[k]))


def digest(value: Any) -> str:
  """Hex SHA-256 of the canonical JSON of `value`."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def array_digest(*arrays: Any) -> str:
  """Hex SHA-256 of arrays' dtypes, shapes and bytes (data the config cannot name)."""
  hasher = hashlib.sha256()
  for array in arrays:
    array = np.ascontiguousarray(np.asarray(array))
    hasher.update(f"{array.dtype}{array.shape}".encode())
    hasher.update(array.tobytes())
  return hasher.hexdigest()[:16]


def tree_digest(tree: Any) -> str:
  """`array_digest` of a pytree's leaves, with its structure."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return digest([str(treedef), array_digest(*[np.asarray(x) for x in leaves])])


def computation_digest(fn: Any, *args: Any, return_shape: bool = False):
  """Hex SHA-256 of what `fn(*args)` computes: its jaxpr and closed-over constants.

  `args` may be arrays or `jax.ShapeDtypeStruct`s (only traced, never run). Two
  functions with the same operations on the same shapes have the same digest,
  wherever their code lives and whatever its comments say; a changed layer, initialiser,
  activation or constant table changes it. The printed jaxpr depends on the JAX
  version too, so a digest may change with an upgrade of JAX (never between
  processes or runs of one installation).

  With `return_shape`, `(digest, out)`: `out` the `jax.ShapeDtypeStruct` tree of
  `fn(*args)`, from the same trace (no second one).
  """
  from simfluence_jax.training import fingerprint as training_fp  # pylint: disable=g-import-not-at-top
  text, consts, out = training_fp.traced_computation(fn, *args)
  result = digest([text, array_digest(*consts) if consts else ""])
  return (result, out) if return_shape else result


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a stage is computed from.

  Attributes:
    fields: config values the stage or its upstream stages read, `{name: value}`.
    upstream: `{stage name: fingerprint}` of the stages whose outputs it takes.
    version: the stage's code version.
    extra: other inputs (e.g. digests of data a user passed in).
    checks: digests of inputs drawn again on every job (the curricula, from the
      seed), the stage's own and every upstream stage's. Not part of the
      fingerprint, so records written before a check existed stay valid; a record
      holding a check with another value is "changed" (`compare`).
  """

  fields: dict
  upstream: dict
  version: int = 1
  extra: dict = dataclasses.field(default_factory=dict)
  checks: dict = dataclasses.field(default_factory=dict)

  @property
  def fingerprint(self) -> str:
    return digest({"fields": self.fields, "upstream": self.upstream,
                   "version": self.version, "extra": self.extra})

  def to_json(self) -> dict:
    return {"fingerprint": self.fingerprint, "fields": self.fields,
            "upstream": self.upstream, "version": self.version, "extra": self.extra,
            "checks": self.checks}


def changed_checks(record: Mapping[str, Any], inputs: Inputs) -> list[str]:
  """Names of the checks both `record` and `inputs` hold, with other values."""
  recorded = record.get("checks") or {}
  return sorted(k for k, v in inputs.checks.items()
                if k in recorded and recorded[k] != v)


def _short(value: Any) -> str:
  text = json.dumps(value, default=repr)
  return text if len(text) <= 40 else text[:37] + "..."


def describe_changes(old: Mapping[str, Any], new: Inputs,
                     limit: int = 6) -> list[str]:
  """`["learning_rate 0.003 -> 0.01", ...]`: how `new` differs from a stored record.

  Config fields come first (what a user changed); a stage whose only difference is
  upstream (e.g. a different dataset file) or its code version says so.
  """
  changes = []
  old_fields = old.get("fields", {})
  for name in sorted(set(old_fields) | set(new.fields)):
    # A field of FIELDS_ADDED_LATER is left out of a record at that value.
    unset = FIELDS_ADDED_LATER.get(name, "<unset>")
    before, after = old_fields.get(name, unset), new.fields.get(name, unset)
    if before != after:
      changes.append(f"{name} {_short(before)} -> {_short(after)}")
  if old.get("version") != new.version:
    changes.append(f"stage code version {old.get('version')} -> {new.version}")
  for name, value in sorted(new.extra.items()):
    if old.get("extra", {}).get(name) != value:
      changes.append(f"{name} changed")
  # Without a config field to explain it, a changed draw is the random stream's.
  hint = "" if changes else (" (drawn again from the seed: another NumPy random "
                             "stream?)")
  for name in changed_checks(old, new):
    changes.append(f"{name} {old['checks'][name]} -> {new.checks[name]}{hint}")
  if not changes:
    for name in sorted(set(old.get("upstream", {})) | set(new.upstream)):
      if old.get("upstream", {}).get(name) != new.upstream.get(name):
        changes.append(f"upstream stage {name} changed")
  if len(changes) > limit:
    changes = changes[:limit] + [f"... {len(changes) - limit} more"]
  return changes


def compare(record: Optional[Mapping[str, Any]], inputs: Inputs) -> str:
  """"missing" (no record), "done" / "unfinished" (same fingerprint), or "changed"."""
  if record is None:
    return "missing"
  if record.get("fingerprint") != inputs.fingerprint or changed_checks(record, inputs):
    return "changed"
  return "done" if record.get("status") == "done" else "unfinished"


def stage_fields(flat_config: Mapping[str, Any], own: Sequence[str],
                 upstream_fields: Iterable[Mapping[str, Any]]) -> dict:
  """A stage's `Inputs.fields`: its own fields plus every upstream stage's."""
  fields = select_fields(flat_config, own)
  for other in upstream_fields:
    fields.update(other)
  return dict(sorted(fields.items()))
