"""data.grain_source: records from an ArrayRecord file -> Dataset rows, row i = id i.

The reference is the project's own numpy pipeline: the generated default task
written to an ArrayRecord file as JSON text records must come back as exactly the
arrays `data.get_dataset` builds, for any worker and (emulated) process count.
"""

import json
import os
import re
import threading

import numpy as np
import pytest

from simfluence_jax import data as data_lib
from simfluence_jax.data import grain_source
from simfluence_jax.data import synthetic_facts

grain = pytest.importorskip("grain")
array_record_module = pytest.importorskip("array_record.python.array_record_module")

NUM_TRAIN, NUM_TEST = 24, 6


def _write(path, records):
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  return str(path)


def _reference():
  """The generated default task (numpy pipeline) and its examples as JSON records."""
  config = data_lib.default_data_config()
  config.num_train_examples, config.num_test_examples = NUM_TRAIN, NUM_TEST
  config.num_pretrain_examples = 0
  dataset = data_lib.get_dataset(config)
  facts = synthetic_facts.generate(config.seed, NUM_TRAIN, NUM_TEST, 0)

  def records(examples):
    return [json.dumps({"question": ex.prompt, "answer": ex.answer}).encode()
            for ex in examples]
  return config, dataset, records(facts.train), records(facts.test)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  config, dataset, train, test = _reference()
  root = tmp_path_factory.mktemp("grain")
  # The train split in two files: record indices run on across them, in order.
  paths = (_write(root / "train-0.array_record", train[:10]) + "," +
           _write(root / "train-1.array_record", train[10:]))
  return {"config": config, "dataset": dataset, "train": paths,
          "test": _write(root / "test.array_record", test), "records": train}


def _grain_config(files, **overrides):
  config = files["config"]
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.name = "grain"
    config.grain_train, config.grain_test = files["train"], files["test"]
    config.grain_decoder, config.grain_workers = "", 0
    config.prompt_feature, config.answer_feature = "question", "answer"
    for key, value in overrides.items():
      config[key] = value
  return config


def _assert_same_rows(got, want):
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert got[key].dtype == want[key].dtype, key


def test_array_record_files_give_the_generated_task_row_for_row(files):
  dataset = grain_source.get_dataset(_grain_config(files))
  want = files["dataset"]
  assert (dataset.kind, dataset.vocab_size) == ("lm", data_lib.BYTE_VOCAB_SIZE)
  _assert_same_rows(dataset.train, want.train)
  _assert_same_rows(dataset.test, want.test)
  assert dataset.train_texts == want.train_texts
  assert dataset.test_texts == want.test_texts
  assert dataset.pretrain is None


@pytest.mark.parametrize("shard_count", [1, 2, 3, 5, NUM_TRAIN + 3])
def test_every_shard_count_gives_the_same_rows(files, shard_count):
  """Shards (one per process) assembled in any order: row i is still record i."""
  source = grain.sources.ArrayRecordDataSource(files["train"].split(","))
  decoder = grain_source.text_decoder(32, "question", "answer")
  shards = [grain_source.read_shard(source, decoder.decode, num_records=NUM_TRAIN,
                                    start=0, shard_index=p, shard_count=shard_count)
            for p in range(shard_count)]
  # Later shards first: arrival order must not matter.
  ids = np.concatenate([s[0] for s in shards[::-1]])
  examples = [e for s in shards[::-1] for e in s[1]]
  arrays, texts = grain_source.assemble(ids, examples, NUM_TRAIN)
  _assert_same_rows(arrays, files["dataset"].train)
  assert texts == files["dataset"].train_texts


def test_start_offsets_the_ids(files):
  source = grain.sources.ArrayRecordDataSource(files["train"].split(","))
  decoder = grain_source.text_decoder(32, "question", "answer")
  arrays, _ = grain_source.read_arrays(source, decoder.decode, num_records=5,
                                       start=7, process_index=0, process_count=1)
  for key, value in files["dataset"].train.items():
    np.testing.assert_array_equal(arrays[key], value[7:12])


def _run_as_processes(monkeypatch, process_count, read):
  """Runs `read(p)` in P threads whose all-gather stacks every thread's input."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  barrier = threading.Barrier(process_count)
  slots, lock = {}, threading.Lock()
  local = threading.local()
  calls = {"count": 0}

  def fake_allgather(tree, tiled=False):
    assert not tiled
    with lock:
      calls["count"] += 1
    slots[local.rank] = tree
    barrier.wait()
    # Through jax arrays, as the real gather: 64-bit dtypes narrow without x64.
    gathered = jax.tree.map(lambda *xs: np.stack([np.asarray(jax.numpy.asarray(x))
                                                  for x in xs]),
                            *[slots[p] for p in range(process_count)])
    barrier.wait()  # nobody overwrites its slot before all have read them
    return gathered

  monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
  results, errors = [None] * process_count, []

  def worker(p):
    local.rank = p
    try:
      results[p] = read(p)
    except Exception as error:  # surfaced in the main thread below
      errors.append(error)
      barrier.abort()

  threads = [threading.Thread(target=worker, args=(p,)) for p in range(process_count)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=60)
  if errors:
    raise errors[0]
  assert calls["count"] > 0, "the multi-process path was not taken"
  return results


@pytest.mark.parametrize("process_count", [2, 3, NUM_TEST + 2])
def test_emulated_processes_all_get_the_full_arrays(files, monkeypatch, process_count):
  """Each process decodes every P-th record; after the gather all hold every row
  (also when some shard is empty: P > n)."""
  source = grain.sources.ArrayRecordDataSource(files["test"])
  decoder = grain_source.text_decoder(32, "question", "answer")
  results = _run_as_processes(monkeypatch, process_count, lambda p: (
      grain_source.read_arrays(source, decoder.decode, num_records=NUM_TEST,
                               process_index=p, process_count=process_count)))
  for arrays, texts in results:
    _assert_same_rows(arrays, files["dataset"].test)
    assert texts == files["dataset"].test_texts


def _float64_example(record):
  values = np.frombuffer(record, np.float64)
  return {"inputs": values[:-1], "labels": np.int32(values[-1])}


def not_a_decoder(data_config):
  del data_config
  return {}


def make_classification_decoder(data_config):
  del data_config
  return grain_source.Decoder(decode=_float64_example, kind="classification",
                              num_classes=3)


def test_custom_decoder_classification_and_exact_64_bit_gather(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(7, 4))  # float64: must survive the gather bit for bit
  labels = rng.integers(0, 3, 7)
  records = [np.append(f, label).astype(np.float64).tobytes()
             for f, label in zip(features, labels)]
  path = _write(tmp_path / "digits.array_record", records)
  test_path = _write(tmp_path / "digits_test.array_record", records[5:])
  config = data_lib.default_data_config()
  with config.unlocked():
    config.name, config.num_train_examples, config.num_test_examples = "grain", 5, 2
    config.grain_train, config.grain_test = path, test_path
    config.grain_decoder = "grain_test:make_classification_decoder"
    config.grain_workers = 0
  dataset = grain_source.get_dataset(config)
  assert (dataset.kind, dataset.num_classes, dataset.vocab_size) == (
      "classification", 3, None)
  np.testing.assert_array_equal(dataset.train["inputs"], features[:5])
  np.testing.assert_array_equal(dataset.train["labels"], labels[:5])
  np.testing.assert_array_equal(dataset.test["labels"], labels[5:])
  assert dataset.train_texts is None
  source = grain.sources.ArrayRecordDataSource(path)
  results = _run_as_processes(monkeypatch, 3, lambda p: grain_source.read_arrays(
      source, _float64_example, num_records=7, process_index=p, process_count=3))
  for arrays, texts in results:
    assert texts is None and arrays["inputs"].dtype == np.float64
    np.testing.assert_array_equal(arrays["inputs"], features)
    np.testing.assert_array_equal(arrays["labels"], labels)


def test_worker_processes_give_the_same_rows(files):
  dataset = grain_source.get_dataset(_grain_config(files, grain_workers=2))
  _assert_same_rows(dataset.train, files["dataset"].train)
  assert dataset.train_texts == files["dataset"].train_texts


def test_lost_or_repeated_records_raise():
  example = {"inputs": np.zeros(2)}
  with pytest.raises(ValueError, match=r"missing ids \[1\], repeated ids \[0\]"):
    grain_source.assemble(np.array([0, 0, 2]), [example] * 3, 3)
  with pytest.raises(ValueError, match="got 2 examples"):
    grain_source.assemble(np.array([0, 1]), [example] * 2, 3)
  with pytest.raises(ValueError, match=r"'inputs' of example 1 has shape \(3,\)"):
    grain_source.assemble(np.array([0, 1]), [example, {"inputs": np.zeros(3)}], 2)


def test_a_value_the_first_example_s_dtype_would_change_is_refused(monkeypatch):
  """Rows are stored in example 0's dtype: a cast that changes a value (a float mask
  into ints, 300 into uint8) is refused, in one process and across processes; float
  rounding (float64 into float32) is not a change."""
  cases = [("mask", np.array([1, 1]), np.array([0.5, 0.25])),
           ("labels", np.uint8(2), np.int64(300)),
           ("labels", np.int32(1), 2.7)]
  for key, first, other in cases:
    with pytest.raises(ValueError, match=(
        rf"^decode: '{key}' of example 1 \(.*\) does not fit example 0's dtype")):
      grain_source.assemble(np.array([0, 1]), [{key: first}, {key: other}], 2)
  arrays, _ = grain_source.assemble(
      np.array([0, 1]), [{"x": np.float32([0.5])}, {"x": np.float64([0.1])}], 2)
  assert arrays["x"].dtype == np.float32 and arrays["x"][1, 0] == np.float32(0.1)
  source = [{"mask": np.array([1, 1])}, {"mask": np.array([0.5, 0.25])}]
  with pytest.raises(ValueError, match="'mask' of example 1 .* does not fit the first"):
    _run_as_processes(monkeypatch, 2, lambda p: grain_source.read_arrays(
        source, lambda record: record, num_records=2, process_index=p,
        process_count=2))


def test_examples_disagreeing_on_text_and_empty_texts_across_processes(monkeypatch):
  with pytest.raises(ValueError, match=r"^decode: example 1 has keys \['x'\], "
                     r"example 0 has \['text', 'x'\]"):
    grain_source.assemble(np.array([0, 1]), [{"x": 0, "text": "a"}, {"x": 1}], 2)
  source = [{"x": np.int32(i), "text": ""} for i in range(4)]
  for arrays, texts in _run_as_processes(monkeypatch, 2, lambda p: (
      grain_source.read_arrays(source, lambda record: record, num_records=4,
                               process_index=p, process_count=2))):
    np.testing.assert_array_equal(arrays["x"], np.arange(4))
    assert texts == ["", "", "", ""]


@pytest.mark.parametrize("record, message", [
    (b"\xff\xfe", "a record is not UTF-8 JSON"),
    (b"[1, 2]", "a record is a JSON list, not an object"),
])
def test_records_that_are_not_json_objects_are_refused_naming_the_field(record,
                                                                       message):
  with pytest.raises(ValueError, match=rf"^config.data.grain_decoder='' .*{message}"):
    grain_source._decode_json_text(record, "inputs", "targets", 32)  # pylint: disable=protected-access


@pytest.mark.parametrize("overrides, message", [
    ({"grain_train": ""}, "config.data.grain_train=''"),
    ({"num_train_examples": NUM_TRAIN + 1},
     f"config.data.num_train_examples={NUM_TRAIN + 1}: grain_train has {NUM_TRAIN}"),
    ({"grain_workers": -1}, "config.data.grain_workers=-1"),
    ({"grain_decoder": "no_colon"}, "config.data.grain_decoder='no_colon'"),
    ({"grain_decoder": "grain_test:not_a_decoder"},
     "config.data.grain_decoder='grain_test:not_a_decoder': returned dict"),
    ({"prompt_feature": "prompt"}, r"no string field\(s\) \['prompt'\]"),
])
def test_bad_config_raises_naming_the_field(files, overrides, message):
  with pytest.raises(ValueError, match=message):
    grain_source.get_dataset(_grain_config(files, **overrides))


def test_a_record_whose_answer_does_not_fit_is_refused_naming_it():
  record = json.dumps({"inputs": "Translate: the cat sat.",
                       "targets": " Le chat etait assis sur le tapis."})
  with pytest.raises(ValueError, match=(
      r"^config.data.seq_len=32: example 0's answer has 35 tokens \(with EOS\).*"
      r"\(the record whose targets starts ' Le chat etait assis sur le tapis.'\)$")):
    grain_source._decode_json_text(record.encode(), "inputs", "targets", 32)  # pylint: disable=protected-access
  # With room for it, the prompt's end and the whole answer are kept.
  row = grain_source._decode_json_text(record.encode(), "inputs", "targets", 48)  # pylint: disable=protected-access
  assert row["mask"].sum() == 35


def test_test_records_from_the_train_files_are_refused(files):
  both = f"{files['test']},{files['train']}"
  with pytest.raises(ValueError, match=(
      r"^config.data.grain_test: shares \[.*\] with config.data.grain_train; the test "
      "examples would be train examples.$")):
    grain_source.get_dataset(_grain_config(files, grain_test=both))
  # The same file under another name (relative, "..") is the same file.
  second = files["train"].split(",")[1]
  folder = os.path.dirname(second)
  other_name = os.path.join(folder, "..", os.path.basename(folder), ".",
                            os.path.basename(second))
  with pytest.raises(ValueError, match=(
      rf"^config.data.grain_test: shares \['{re.escape(other_name)}'\]")):
    grain_source.get_dataset(_grain_config(files, grain_test=other_name))


def _int_tokens_example(record):
  tokens = np.frombuffer(record, np.int32)
  # A decoder bug a user could write: the mask of a record starting with 5 is 0.
  mask = np.full(len(tokens), 0.0 if tokens[0] == 5 else 1.0, np.float32)
  return {"inputs": np.r_[0, tokens[:-1]].astype(np.int32), "targets": tokens,
          "mask": mask}


def make_masking_decoder(data_config):
  del data_config
  return grain_source.Decoder(decode=_int_tokens_example, kind="lm", vocab_size=16)


def _lm_records_config(tmp_path, firsts, decoder):
  """(records, data config): 2 train and 2 test records [first, 7, 8, 1] (int32),
  read by `decoder` ("grain_test:<function>")."""
  records = [np.array([first, 7, 8, 1], np.int32).tobytes() for first in firsts]
  config = data_lib.default_data_config()
  with config.unlocked():
    config.name, config.num_train_examples, config.num_test_examples = "grain", 2, 2
    config.grain_train = _write(tmp_path / "train.array_record", records[:2])
    config.grain_test = _write(tmp_path / "test.array_record", records[2:])
    config.grain_decoder = decoder
    config.grain_workers = 0
  return records, config


def test_language_model_examples_with_no_scored_token_are_refused(tmp_path):
  records, config = _lm_records_config(tmp_path, (3, 4, 5, 6),
                                       "grain_test:make_masking_decoder")
  with pytest.raises(ValueError, match=(
      r"^config.data.name='grain': test examples \[0\] \(1 in all\) have an empty "
      r"loss mask")):
    data_lib.get_dataset(config)
  # Scored everywhere: loads, every mask as decoded.
  config.grain_test = _write(tmp_path / "test2.array_record", records[:1] + records[3:])
  dataset = data_lib.get_dataset(config)
  np.testing.assert_array_equal(dataset.test["mask"], np.ones((2, 4)))


def _copying_example(record):
  tokens = np.frombuffer(record, np.int32)
  # A decoder bug a user could write: targets not shifted, so the model learns to
  # copy its input.
  return {"inputs": tokens, "targets": tokens, "mask": np.ones(len(tokens), np.float32)}


def make_copying_decoder(data_config):
  del data_config
  return grain_source.Decoder(decode=_copying_example, kind="lm", vocab_size=16)


def test_targets_equal_to_inputs_are_refused(tmp_path):
  _, config = _lm_records_config(tmp_path, (3, 4, 6, 2),
                                 "grain_test:make_copying_decoder")
  with pytest.raises(ValueError, match=(
      r"^config.data.name='grain': every train example's targets equal its inputs at "
      r"every scored token; the targets must be the next tokens")):
    data_lib.get_dataset(config)
  # Shifted targets (the masking decoder's; no record starts with 5, so every
  # mask is 1) load as decoded.
  config.grain_decoder = "grain_test:make_masking_decoder"
  dataset = data_lib.get_dataset(config)
  np.testing.assert_array_equal(dataset.train["targets"][0], [3, 7, 8, 1])
  np.testing.assert_array_equal(dataset.train["inputs"][0], [0, 3, 7, 8])
