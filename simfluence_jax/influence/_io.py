"""Saving and loading fitted EK-FAC factors (orbax arrays + JSON layer specs).

Layout of a factors directory:

    path/arrays/       orbax StandardCheckpointer tree {"factor_<i>": {
                           "activation_eigenvectors", "gradient_eigenvectors",
                           "eigenvalues"}} for the i-th entry of `factor_names`
    path/factors.json  {"format", "version", "factor_names", "fingerprint",
                       "values_checksum", "loss_fingerprint", "loss_example",
                       "layers": [LayerSpec fields]}: the static part of
                       `EKFACFactors` (version 1 files, without block, config,
                       kernel shape, dtype and fingerprint, and files without
                       values_checksum or loss_fingerprint, still load; those
                       unchecked against the params' values or the task's loss)

Arrays are keyed by position rather than by layer name because layer names hold
"/", which orbax would read as nesting. `factors.json` is written last, atomically
(`_io.atomic_write`: a temporary file and `os.replace` locally, one whole object in
a bucket), and removed first when overwriting: it is the commit marker, so a crash
never leaves a directory that loads with stale specs. `path` may be local or a
gs:// bucket (every access goes through `etils.epath`). Saving is collective like
any orbax save (call it on every process); only the primary process writes the
JSON. orbax is imported when first needed, so that importing
`simfluence_jax.influence` stays light.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _io
from simfluence_jax.influence import _ekfac
from simfluence_jax.influence import _layers

ARRAYS_DIR = "arrays"
METADATA_FILE = "factors.json"
_FORMAT = "simfluence_jax.EKFACFactors"
_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(_layers.LayerSpec))
# Fields version 1 files do not have (their layers were all dense).
_V2_FIELDS = ("block", "config", "kernel_shape", "param_dtype")


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer()


def _to_json(value):
  if isinstance(value, tuple):
    return [_to_json(v) for v in value]
  return value


def _freeze(value):
  """JSON lists back to the (nested) tuples of a LayerSpec."""
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  return value


def _spec_to_json(spec: _layers.LayerSpec) -> dict:
  return {f.name: _to_json(getattr(spec, f.name))
          for f in dataclasses.fields(spec)}


def _spec_from_json(entry, path, version: int) -> _layers.LayerSpec:
  required = set(_SPEC_FIELDS) - (set(_V2_FIELDS) if version == 1 else set())
  if not isinstance(entry, dict) or not required <= set(entry) <= set(_SPEC_FIELDS):
    raise ValueError(f"load_factors: corrupt {METADATA_FILE} in {path!r}: a layer "
                     f"entry must have the fields {sorted(required)}, got "
                     f"{entry!r}.")
  return _layers.LayerSpec(**{name: _freeze(value) for name, value in entry.items()})


def _write_json_atomically(path, payload: dict) -> None:
  def write(temporary):
    with open(temporary, "w") as f:  # a local temporary file (`_io.atomic_write`)
      json.dump(payload, f, indent=2, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
  _io.atomic_write(path, write)


def save_factors(path, factors: _ekfac.EKFACFactors, *,
                 overwrite: bool = False) -> None:
  """Saves `EKFACFactors` to directory `path`, blocking until written.

  Args:
    path: directory to create (its parent is created if needed).
    factors: from `fit_ekfac`.
    overwrite: replace the factors already saved at `path`; other files in the
      directory are left alone.

  Raises:
    FileExistsError: `path` exists and is not empty, and `overwrite` is False.
    NotADirectoryError: `path` exists and is a file.
    ValueError: `factors` is not an `EKFACFactors`.
  """
  if not isinstance(factors, _ekfac.EKFACFactors):
    raise ValueError(f"save_factors: factors must be EKFACFactors, got "
                     f"{type(factors).__name__}.")
  path = _io.as_path(path)
  name = os.fspath(path)
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"save_factors: {name!r} exists and is not a directory.")
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise FileExistsError(f"save_factors: {name!r} exists and is not empty; pass "
                          f"overwrite=True to replace the factors saved there.")
  primary = jax.process_index() == 0
  metadata_path = path / METADATA_FILE
  if primary:
    path.mkdir(parents=True, exist_ok=True)
    # Removed first: between here and the final JSON write the directory is
    # "incomplete" to `load_factors`, never old specs with new arrays.
    if metadata_path.exists():
      metadata_path.unlink()
  names = list(factors.factors)
  tree, empty = {}, {}
  for i, name in enumerate(names):
    # orbax refuses zero-size arrays (the identity-basis placeholder of a diagonal
    # factor): they go to the JSON as (shape, dtype) instead.
    arrays = factors.factors[name]._asdict()
    tree[f"factor_{i}"] = {k: v for k, v in arrays.items() if np.size(v)}
    empty[f"factor_{i}"] = {k: [list(np.shape(v)), str(np.dtype(v.dtype))]
                            for k, v in arrays.items() if not np.size(v)}
  with _checkpointer() as checkpointer:
    checkpointer.save(path / ARRAYS_DIR, tree, force=True)
    checkpointer.wait_until_finished()
  if primary:
    _write_json_atomically(metadata_path, {
        "format": _FORMAT, "version": _VERSION, "factor_names": names,
        "fingerprint": factors.fingerprint,
        "values_checksum": factors.values_checksum,
        "loss_fingerprint": factors.loss_fingerprint,
        "loss_example": _to_json(factors.loss_example), "empty_arrays": empty,
        "layers": [_spec_to_json(spec) for spec in factors.layers]})


def _read_metadata(path: str) -> dict:
  metadata_path = os.path.join(path, METADATA_FILE)
  if not _io.exists(metadata_path):
    raise ValueError(f"load_factors: {path!r} is not a complete EK-FAC factors "
                     f"directory (no {METADATA_FILE}; an interrupted save, or "
                     f"another kind of directory).")
  try:
    metadata = json.loads(_io.read_text(metadata_path))
  except (OSError, ValueError) as error:
    raise ValueError(f"load_factors: corrupt {METADATA_FILE} in {path!r}: "
                     f"{error}") from error
  if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
    raise ValueError(f"load_factors: {metadata_path!r} is not an EK-FAC factors "
                     f"file (format {_FORMAT!r} expected).")
  if metadata.get("version") not in _READABLE_VERSIONS:
    raise ValueError(f"load_factors: {metadata_path!r} has version "
                     f"{metadata.get('version')!r}; this code reads "
                     f"{list(_READABLE_VERSIONS)}.")
  if (not isinstance(metadata.get("factor_names"), list)
      or not isinstance(metadata.get("layers"), list)):
    raise ValueError(f"load_factors: corrupt {METADATA_FILE} in {path!r}: "
                     f"'factor_names' and 'layers' must be lists.")
  return metadata


def load_factors(path) -> _ekfac.EKFACFactors:
  """Loads factors saved by `save_factors`, bit-equal to the saved ones.

  Args:
    path: the directory given to `save_factors`.

  Returns:
    `EKFACFactors` with jax arrays (saved dtypes) on the default device.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: `path` is not a complete factors directory, or its metadata or
      arrays are corrupt or disagree with each other.
  """
  root = _io.as_path(path)
  path = os.fspath(root)  # for messages
  if not root.exists():
    raise FileNotFoundError(f"load_factors: no EK-FAC factors at {path!r}.")
  if not root.is_dir():
    raise ValueError(f"load_factors: {path!r} is not a directory.")
  metadata = _read_metadata(path)
  layers = tuple(_spec_from_json(entry, path, metadata["version"])
                 for entry in metadata["layers"])
  fingerprint = metadata.get("fingerprint")
  if fingerprint is not None and not isinstance(fingerprint, str):
    raise ValueError(f"load_factors: corrupt {METADATA_FILE} in {path!r}: "
                     f"'fingerprint' must be a string, got {fingerprint!r}.")
  checksum = metadata.get("values_checksum")
  if checksum is not None and not isinstance(checksum, str):
    raise ValueError(f"load_factors: corrupt {METADATA_FILE} in {path!r}: "
                     f"'values_checksum' must be a string, got {checksum!r}.")
  loss_digest, loss_example = _loss_identity(metadata, path)
  names = metadata["factor_names"]
  arrays_path = root / ARRAYS_DIR
  if not arrays_path.is_dir():
    raise ValueError(f"load_factors: {path!r} has no {ARRAYS_DIR}/ directory.")
  fields = _ekfac.LayerFactors._fields
  empty = metadata.get("empty_arrays", {})
  if not isinstance(empty, dict):
    raise ValueError(f"load_factors: corrupt {METADATA_FILE} in {path!r}: "
                     f"'empty_arrays' must be an object.")
  expected = {f"factor_{i}" for i in range(len(names))}
  restored = None
  try:
    with _checkpointer() as checkpointer:
      saved = checkpointer.metadata(arrays_path).item_metadata.tree
      if (set(saved) == expected
          and all(set(saved[key]) | set(empty.get(key, {})) == set(fields)
                  for key in expected)):
        # Targets on this process's first device, whatever device layout the
        # factors were fitted on (without a sharding, orbax restored the saved
        # layout: factors fitted on 4 devices failed to load on 1; review h34).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
            saved)
        restored = checkpointer.restore(arrays_path, target)
  except Exception as error:  # pylint: disable=broad-except  # orbax raises assorted types on damaged files.
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise ValueError(f"load_factors: cannot read the arrays in "
                     f"{os.fspath(arrays_path)!r}: {first}") from error
  if restored is None:
    raise ValueError(f"load_factors: arrays in {os.fspath(arrays_path)!r} do not match "
                     f"the {len(names)} factors listed in {METADATA_FILE}.")
  def array(key, field):
    if field in empty.get(key, {}):
      shape, dtype = empty[key][field]
      return jnp.zeros(tuple(shape), dtype)
    return jnp.asarray(np.asarray(restored[key][field]))

  factors = {name: _ekfac.LayerFactors(**{
      field: array(f"factor_{i}", field) for field in fields})
             for i, name in enumerate(names)}
  return _ekfac.EKFACFactors(layers, factors, fingerprint, checksum, loss_digest,
                             loss_example)


def _loss_identity(metadata: dict, path: str):
  """(loss_fingerprint, loss_example) of the metadata; (None, None) when absent
  (files saved before them: the loss is then not checked)."""
  digest, example = metadata.get("loss_fingerprint"), metadata.get("loss_example")
  if digest is None and example is None:
    return None, None
  corrupt = (f"load_factors: corrupt {METADATA_FILE} in {path!r}: 'loss_fingerprint' "
             f"must be a string and 'loss_example' a list of [path, shape, dtype] "
             f"(a path of dict keys and positions, empty only for a one-array batch), "
             f"got {digest!r} and {example!r}.")
  if not isinstance(digest, str) or not isinstance(example, list) or not example:
    raise ValueError(corrupt)
  entries = []
  for entry in example:
    if not (isinstance(entry, list) and len(entry) == 3
            and isinstance(entry[0], list) and (entry[0] or len(example) == 1)
            and all(isinstance(k, str) or (isinstance(k, int) and
                                           not isinstance(k, bool) and k >= 0)
                    for k in entry[0])
            and isinstance(entry[1], list)
            and all(isinstance(n, int) and n >= 0 for n in entry[1])
            and isinstance(entry[2], str)):
      raise ValueError(corrupt)
    entries.append((tuple(entry[0]), tuple(entry[1]), entry[2]))
  return digest, tuple(entries)
