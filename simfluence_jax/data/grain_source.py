"""Users' own datasets through grain: records -> `Dataset` arrays, without TensorFlow.

grain (the input library MaxText uses for multi-host input) reads ArrayRecord files,
or any random-access source (`len(source)`, `source[i]`), with worker processes. This
module turns the first n records of such a source into the stacked arrays of a
`Dataset`, where row i is record `start + i` — example id i — whatever the number of
grain workers or JAX processes: every decoded element carries its record index and
is placed by it, never by arrival order, and each id must arrive exactly once.

On a multi-process job each process decodes every P-th record and the shards are
all-gathered, so decoding scales with the processes and all of them end with the
same full arrays (training gathers any example id on any process).

In a config (`config.data.name = "grain"`, needs the `grain` extra):

  config.data.grain_train = "/data/train.array_record"  # comma-separated paths
  config.data.grain_test = "/data/test.array_record"
  config.data.grain_decoder = ""     # "" = JSON text records, or "pkg.module:fn"
  config.data.grain_workers = 0      # grain worker processes (0 = this process)

The default decoder reads UTF-8 JSON objects whose `config.data.prompt_feature` and
`answer_feature` strings are byte-tokenized and packed to `seq_len` exactly as the
generated default task is (`packing.py`); `grain_decoder="pkg.module:fn"` names
`fn(data_config) -> Decoder` for any other record format.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import posixpath
from typing import Any, Callable, Optional, Sequence

import numpy as np

from simfluence_jax import _checks
from simfluence_jax import _optional
from simfluence_jax.data import dataset as dataset_lib
from simfluence_jax.data import packing

_TEXT_KEY = "text"  # an optional str of each decoded example (report titles)
KINDS = ("lm", "classification")
# The `config.data` fields of this source and their defaults (read with these
# defaults when a config predates them).
CONFIG_DEFAULTS = {"grain_train": "", "grain_test": "", "grain_decoder": "",
                   "grain_workers": 0}


@dataclasses.dataclass(frozen=True)
class Decoder:
  """How one record becomes one example of a `Dataset`.

  Attributes:
    decode: record (what the source yields, e.g. bytes) -> {key: array} of ONE
      example, fixed shapes per key: LM {"inputs": int32[L], "targets": int32[L],
      "mask": float32[L]}, classification {"inputs": float32[D], "labels": int32[]};
      optionally "text": str. Must be picklable (a module-level function or a
      functools.partial of one) when grain worker processes are used.
    kind: "lm" or "classification".
    vocab_size: V of the LM tokens (kind "lm").
    num_classes: C (kind "classification").
  """
  decode: Callable[[Any], dict]
  kind: str = "lm"
  vocab_size: Optional[int] = None
  num_classes: Optional[int] = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Decoder.kind={self.kind!r}: expected one of {KINDS}.")
    size, name = ((self.vocab_size, "vocab_size") if self.kind == "lm"
                  else (self.num_classes, "num_classes"))
    if not _checks.is_int(size) or size <= 0:
      raise ValueError(f"Decoder.{name}={size!r}: a {self.kind} decoder needs a "
                       "positive integer.")


def _decode_json_text(record, prompt_feature: str, answer_feature: str,
                      seq_len: int) -> dict:
  try:
    example = json.loads(record.decode("utf-8") if isinstance(record, bytes)
                         else record)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"config.data.grain_decoder='' (JSON text records): a record "
                     f"is not UTF-8 JSON ({e}); name a decoder for this format "
                     "in config.data.grain_decoder.") from None
  if not isinstance(example, dict):
    raise ValueError(f"config.data.grain_decoder='' (JSON text records): a record "
                     f"is a JSON {type(example).__name__}, not an object with "
                     f"fields {prompt_feature!r} and {answer_feature!r}.")
  missing = [f for f in (prompt_feature, answer_feature)
             if not isinstance(example.get(f), str)]
  if missing:
    raise ValueError(f"config.data.prompt_feature/answer_feature: record has no "
                     f"string field(s) {missing} (fields: {sorted(example)}).")
  prompt, answer = example[prompt_feature], example[answer_feature]
  try:
    row = packing.pack([packing.tokenize_bytes(prompt)],
                       [packing.tokenize_bytes(answer, add_eos=True)], seq_len)
  except ValueError as e:  # "example 0" is this record
    raise ValueError(f"{e} (the record whose {answer_feature} starts "
                     f"{answer[:40]!r})") from None
  return {**{key: value[0] for key, value in row.items()}, _TEXT_KEY: prompt + answer}


def text_decoder(seq_len: int, prompt_feature: str = "inputs",
                 answer_feature: str = "targets") -> Decoder:
  """JSON text records -> packed byte-vocabulary LM examples (the default decoder).

  Each record is a UTF-8 JSON object; its `prompt_feature` and `answer_feature`
  strings are tokenized and packed like the generated default task (the loss is on
  the answer and its EOS).
  """
  return Decoder(decode=functools.partial(
      _decode_json_text, prompt_feature=prompt_feature,
      answer_feature=answer_feature, seq_len=int(seq_len)),
                 kind="lm", vocab_size=dataset_lib.BYTE_VOCAB_SIZE)


class _Tagged:
  """record -> (record index, decoded example): the id travels with the element."""

  def __init__(self, decode: Callable[[Any], dict]):
    self.decode = decode

  def __call__(self, index: int, record) -> tuple[int, dict]:
    return int(index), self.decode(record)


def _grain():
  return _optional.import_module("grain", "grain", "data.grain_source")


def read_shard(source, decode: Callable[[Any], dict], *, num_records: int,
               start: int = 0, shard_index: int = 0, shard_count: int = 1,
               num_workers: int = 0) -> tuple[np.ndarray, list]:
  """Decodes this shard's records: ids shard_index, shard_index + shard_count, ...

  Args:
    source: a grain data source (e.g. `grain.sources.ArrayRecordDataSource`) or any
      random-access sequence; record `start + i` is example id i.
    decode: record -> {key: array} of one example (`Decoder.decode`).
    num_records: n, the example ids are 0..n-1.
    start: index of the record of example id 0.
    shard_index, shard_count: this shard reads the ids i with i % shard_count ==
      shard_index.
    num_workers: grain worker processes decoding in parallel (0 = this process).

  Returns:
    (ids int64[k], k decoded examples, ids[j] being example j's id), in whatever
    order the workers delivered them.
  """
  grain = _grain()
  dataset = grain.MapDataset.source(source).map_with_index(_Tagged(decode))
  dataset = dataset[start + shard_index:start + num_records:shard_count]
  if num_workers:
    from absl import flags  # pylint: disable=g-import-not-at-top
    # grain's worker processes read an absl flag even when the caller never parsed
    # flags (a notebook, a test); their defaults are what it needs.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    elements = dataset.to_iter_dataset().mp_prefetch(
        grain.MultiprocessingOptions(num_workers=int(num_workers)))
  else:
    elements = dataset
  ids, examples = [], []
  for index, example in elements:
    ids.append(index - start)
    examples.append(example)
  return np.asarray(ids, np.int64), examples


def assemble(ids: np.ndarray, examples: Sequence[dict], num_records: int
             ) -> tuple[dict, Optional[list]]:
  """Stacks decoded examples so that row i is example id i.

  Args:
    ids: int[n] the id of each example (any order; shards concatenated).
    examples: n decoded examples ({key: array}, optional "text": str).
    num_records: n.

  Returns:
    ({key: array[n, ...]}, texts: n strings or None).

  Raises:
    ValueError: an id is missing, repeated or out of range (a source or worker
      setup that loses or duplicates records), or keys / shapes differ between
      examples.
  """
  ids = np.asarray(ids, np.int64)
  counts = np.bincount(ids[(ids >= 0) & (ids < num_records)], minlength=num_records)
  if len(ids) != num_records or np.any(counts != 1):
    missing = np.flatnonzero(counts == 0)[:5].tolist()
    repeated = np.flatnonzero(counts > 1)[:5].tolist()
    raise ValueError(f"num_records={num_records}: got {len(ids)} examples; missing "
                     f"ids {missing}, repeated ids {repeated} (first five).")
  if not num_records:
    return {}, None
  _check_keys(ids, examples, examples[0], f"example {ids[0]}")
  keys = sorted(k for k in examples[0] if k != _TEXT_KEY)
  arrays = {}
  for key in keys:
    first = np.asarray(examples[0][key])
    out = np.zeros((num_records,) + first.shape, first.dtype)
    for row, example in zip(ids, examples):
      value = np.asarray(example[key])
      if value.shape != first.shape:
        raise ValueError(f"decode: {key!r} of example {row} has shape "
                         f"{value.shape}, of example {ids[0]} {first.shape}.")
      out[row] = _exact_cast(value, first.dtype, key, row, f"example {ids[0]}")
    arrays[key] = out
  texts = None
  if _TEXT_KEY in examples[0]:
    texts = [None] * num_records
    for row, example in zip(ids, examples):
      texts[row] = str(example[_TEXT_KEY])
  return arrays, texts


def _check_keys(ids, examples, reference: dict, name: str) -> None:
  """Raises ValueError unless every example has `reference`'s keys ("text" too)."""
  for row, example in zip(ids, examples):
    if sorted(example) != sorted(reference):
      raise ValueError(f"decode: example {row} has keys {sorted(example)}, {name} "
                       f"has {sorted(reference)}.")


def _exact_cast(value: np.ndarray, dtype, key: str, row, reference: str) -> np.ndarray:
  """`value` as `dtype` (`reference`'s: the first example's), refused where that
  changes a value (a float mask 0.5 stored as int 0, a label 300 as uint8 44)."""
  cast = value.astype(dtype)
  if value.dtype == dtype:
    return cast
  if np.issubdtype(value.dtype, np.floating) and np.issubdtype(dtype, np.floating):
    changed = np.any(np.isfinite(value) & ~np.isfinite(cast))  # rounding is fine
  else:
    changed = not np.array_equal(cast.astype(value.dtype), value, equal_nan=bool(
        np.issubdtype(value.dtype, np.inexact)))
  if changed:
    raise ValueError(f"decode: {key!r} of example {row} ({value.dtype}) does not "
                     f"fit {reference}'s dtype ({dtype}) without changing values; "
                     "make the decoder return one dtype per key.")
  return cast


def _as_bytes(array: np.ndarray) -> np.ndarray:
  """[rows, ...] -> uint8[rows, bytes per row], exact for every dtype."""
  return np.ascontiguousarray(array).reshape(len(array), -1).view(np.uint8)


def _allgather_shards(ids: np.ndarray, examples: list, template: dict,
                      num_records: int, process_count: int) -> tuple[np.ndarray, list]:
  """Every process's (ids, examples) on every process.

  Shards are padded to ceil(n / P) rows (id -1) so the gather has equal shapes on
  every process; `template` (a decoded example, the same on every process) gives
  the keys, shapes and dtypes even to a process whose shard is empty. Arrays travel
  as their bytes (jax would narrow 64-bit dtypes), texts as UTF-8 padded to the
  longest text of all processes.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  rows = -(-num_records // process_count)
  keys = sorted(k for k in template if k != _TEXT_KEY)
  specs = {k: (np.shape(template[k]), np.asarray(template[k]).dtype) for k in keys}
  _check_keys(ids, examples, template, "the first example")
  padded_ids = np.full(rows, -1, np.int32)  # num_records < 2**31: ids fit
  padded_ids[:len(ids)] = ids
  payload = {}
  for k, (shape, dtype) in specs.items():
    values = np.zeros((rows,) + shape, dtype)
    for j, (row, example) in enumerate(zip(ids, examples)):
      values[j] = _exact_cast(np.asarray(example[k]), dtype, k, row,
                              "the first example")
    payload[k] = _as_bytes(values)
  if _TEXT_KEY in template:
    encoded = [e[_TEXT_KEY].encode("utf-8") for e in examples]
    # At least one byte: a gather of [rows, 0] could not be reshaped back.
    longest = max(1, int(np.max(multihost_utils.process_allgather(
        np.int32(max((len(t) for t in encoded), default=0))))))
    text = np.zeros((rows, longest), np.uint8)
    lengths = np.zeros(rows, np.int32)
    for j, t in enumerate(encoded):
      text[j, :len(t)] = np.frombuffer(t, np.uint8)
      lengths[j] = len(t)
    payload[_TEXT_KEY] = (text, lengths)
  gathered_ids, gathered = multihost_utils.process_allgather((padded_ids, payload))
  gathered_ids = np.asarray(gathered_ids).reshape(-1)
  keep = np.flatnonzero(gathered_ids >= 0)
  flat = {}
  for k, (shape, dtype) in specs.items():
    raw = np.asarray(gathered[k], np.uint8)
    flat[k] = np.ascontiguousarray(raw.reshape(-1, raw.shape[-1])).view(
        dtype).reshape((-1,) + shape)
  out = [{k: flat[k][j] for k in keys} for j in keep]
  if _TEXT_KEY in template:
    text, lengths = (np.asarray(x) for x in gathered[_TEXT_KEY])
    text = text.reshape(-1, text.shape[-1]).astype(np.uint8)
    lengths = lengths.reshape(-1)
    for example, j in zip(out, keep):
      example[_TEXT_KEY] = text[j, :lengths[j]].tobytes().decode("utf-8")
  return gathered_ids[keep].astype(np.int64), out


def read_arrays(source, decode: Callable[[Any], dict], *, num_records: int,
                start: int = 0, num_workers: int = 0,
                process_index: Optional[int] = None,
                process_count: Optional[int] = None) -> tuple[dict, Optional[list]]:
  """Records start..start+n-1 of `source` as stacked arrays, row i = example id i.

  Args:
    source: a grain data source or any random-access sequence of records.
    decode: record -> {key: array} of one example, optional "text": str.
    num_records: n.
    start: the record of example id 0.
    num_workers: grain worker processes per JAX process (0 = in process).
    process_index, process_count: this process and the number of processes (None:
      `jax.process_index()` / `jax.process_count()`); with several, each decodes
      every P-th record and the shards are all-gathered (a collective: call it on
      every process).

  Returns:
    ({key: array[n, ...]}, n texts or None), identical for any worker and process
    count.

  Raises:
    ValueError: `source` has fewer than start + n records, or `assemble`'s checks.
  """
  if not _checks.is_int(num_records) or num_records < 0:
    raise ValueError(f"num_records={num_records!r}: must be a non-negative integer.")
  if len(source) < start + num_records:
    raise ValueError(f"num_records={num_records}: the source has {len(source)} "
                     f"records (start={start}).")
  if process_count is None or process_index is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  ids, examples = read_shard(source, decode, num_records=num_records, start=start,
                             shard_index=process_index, shard_count=process_count,
                             num_workers=num_workers)
  if process_count > 1 and num_records:
    ids, examples = _allgather_shards(ids, examples, decode(source[start]),
                                      num_records, process_count)
  return assemble(ids, examples, num_records)


def _paths(field: str, value) -> list:
  paths = [p.strip() for p in str(value or "").split(",") if p.strip()]
  if not paths:
    raise ValueError(f"config.data.{field}={value!r}: name the ArrayRecord file(s) "
                     "(comma-separated) for config.data.name='grain'.")
  return paths


def _canonical(path: str) -> str:
  """One name per file: a local path resolved (absolute, links followed), a URL
  with its path normalised ('gs://b/d/../f' and 'gs://b/f' alike)."""
  scheme, sep, rest = path.partition("://")
  if sep:
    return f"{scheme}://{posixpath.normpath(rest)}"
  return os.path.realpath(path)


def make_decoder(data_config) -> Decoder:
  """The decoder `config.data.grain_decoder` names ("" = JSON text records)."""
  spec = data_config.get("grain_decoder", "")
  if not spec:
    return text_decoder(data_config.seq_len, data_config.get("prompt_feature", "inputs"),
                        data_config.get("answer_feature", "targets"))
  module_name, sep, function = str(spec).partition(":")
  if not sep or not module_name or not function:
    raise ValueError(f"config.data.grain_decoder={spec!r}: expected "
                     "'package.module:function'.")
  try:
    factory = getattr(importlib.import_module(module_name), function)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"config.data.grain_decoder={spec!r}: cannot be imported "
                     f"({e}).") from e
  decoder = factory(data_config)
  if not isinstance(decoder, Decoder):
    raise ValueError(f"config.data.grain_decoder={spec!r}: returned "
                     f"{type(decoder).__name__}, not a grain_source.Decoder.")
  return decoder


def get_dataset(config) -> dataset_lib.Dataset:
  """`config.data.name == "grain"`: the first N / M records of the train / test files.

  Args:
    config: the full config (with `.data`) or its data section; reads
      `num_train_examples`, `num_test_examples`, `seq_len`, `prompt_feature`,
      `answer_feature` and the fields of CONFIG_DEFAULTS.

  Returns:
    A `Dataset` (no pretrain split) whose row i is record i of its split.

  Raises:
    ValueError: naming the field (no paths, too few records, a bad decoder).
    MissingExtraError: grain is not installed (the `grain` extra).
  """
  data_config = config.data if "data" in config else config
  grain = _grain()
  workers = data_config.get("grain_workers", 0)
  if not _checks.is_int(workers) or workers < 0:
    raise ValueError(f"config.data.grain_workers={workers!r}: must be a non-negative "
                     "integer.")
  decoder = make_decoder(data_config)
  splits, sources = {}, {}
  for split, paths_field, count_field in (
      ("train", "grain_train", "num_train_examples"),
      ("test", "grain_test", "num_test_examples")):
    paths = _paths(paths_field, data_config.get(paths_field, ""))
    source = grain.sources.ArrayRecordDataSource(paths)
    count = data_config[count_field]
    if count > len(source):
      raise ValueError(f"config.data.{count_field}={count}: {paths_field} has "
                       f"{len(source)} records.")
    shared = sorted(p for p in paths if split == "test" and _canonical(p) in
                    {_canonical(q) for q in sources["train"]})
    if shared:
      raise ValueError(f"config.data.grain_test: shares {shared} with "
                       "config.data.grain_train; the test examples would be train "
                       "examples.")
    splits[split] = read_arrays(source, decoder.decode, num_records=count,
                                num_workers=workers)
    sources[split] = paths
  return dataset_lib.Dataset(
      name="grain", kind=decoder.kind, train=splits["train"][0],
      test=splits["test"][0], train_texts=splits["train"][1],
      test_texts=splits["test"][1],
      vocab_size=decoder.vocab_size if decoder.kind == "lm" else None,
      num_classes=decoder.num_classes if decoder.kind == "classification" else None,
      metadata={"source": "grain", "train_files": sources["train"],
                "test_files": sources["test"],
                "decoder": data_config.get("grain_decoder", "") or "json_text"})
