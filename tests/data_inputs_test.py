"""Bad `config.data` inputs are refused with one line naming the field; valid ones
keep their arrays (seqio vocabularies and splits, ignored fields, .npy files)."""

import os
import pathlib
import re
import sys
from unittest import mock

import ml_collections
import numpy as np
import pytest

from simfluence_jax import _io
from simfluence_jax import config_lib
from simfluence_jax import data
from simfluence_jax.data import dataset as dataset_lib
from simfluence_jax.data import packing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_TEST, SEQ_LEN = 6, 3, 40


def _examples(split):
  offset = {"train": 0, "validation": 1000}[split]
  return ([f"question {offset + i}: what?" for i in range(NUM_TRAIN + 2)],
          [f" yes{i % 2}" for i in range(NUM_TRAIN + 2)])


def _register(name, prompt_vocab, answer_vocab=None, prompt_eos=False):
  """A seqio Task over `_examples` whose prompt ("inputs") is tokenized by
  `prompt_vocab` and answer ("targets") by `answer_vocab` (ByteVocabulary); with
  `prompt_eos`, the prompt ends in EOS too (T5's super_glue_*_v102 style)."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    prompts, answers = _examples(split)
    return tf.data.Dataset.from_tensor_slices({"inputs": prompts, "targets": answers})

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset_fn, splits=("train", "validation")),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={
          "inputs": seqio.Feature(prompt_vocab, add_eos=prompt_eos),
          "targets": seqio.Feature(answer_vocab or seqio.ByteVocabulary(),
                                   add_eos=True)})
  return name


def _vocabularies():
  import seqio  # pylint: disable=g-import-not-at-top

  class BigByteVocab(seqio.ByteVocabulary):
    """The byte ids shifted by 1000: another (encoder's) vocabulary, 1256 ids."""

    @property
    def _base_vocab_size(self):
      return 256 + 1000

    def _encode(self, s):
      return [t + 1000 for t in super()._encode(s)]

    def _encode_tf(self, s):
      return super()._encode_tf(s) + 1000

  class RotatedByteVocab(seqio.ByteVocabulary):
    """As many ids (259) as the byte vocabulary, other ids."""

    def _encode_tf(self, s):
      return (super()._encode_tf(s) - 3 + 128) % 256 + 3

  class SmallByteVocab(seqio.ByteVocabulary):
    """Claims 100 ids but encodes bytes up to id 258."""

    @property
    def _base_vocab_size(self):
      return 100

  return BigByteVocab, RotatedByteVocab, SmallByteVocab


def _seqio_config(task, **overrides):
  config = data.default_data_config()
  config.name, config.seqio_task = "seqio", task
  config.num_train_examples, config.num_test_examples = NUM_TRAIN, NUM_TEST
  config.seq_len = SEQ_LEN
  config.update(overrides)
  return config


def _packed(split, count):
  prompts, answers = _examples(split)
  return packing.pack(
      [packing.tokenize_bytes(p) for p in prompts[:count]],
      [packing.tokenize_bytes(a, add_eos=True) for a in answers[:count]], SEQ_LEN)


def _assert_arrays_equal(got, want):
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ------------------------------------------------- 1. the prompt's vocabulary


@pytest.mark.parametrize("vocab_index,message", [
    (0, r"^config.data.prompt_feature='inputs': its vocabulary \(BigByteVocab, 1256 "
        r"ids\) is not the vocabulary of config.data.answer_feature='targets' "
        r"\(ByteVocabulary, 259 ids\)"),
    (1, r"^config.data.prompt_feature='inputs': its vocabulary \(RotatedByteVocab, "
        r"259 ids\) is not the vocabulary of config.data.answer_feature='targets'"),
])
def test_a_prompt_in_another_vocabulary_is_refused(vocab_index, message):
  vocab = _vocabularies()[vocab_index]()
  task = _register(f"data_inputs_prompt_vocab_{vocab_index}", vocab)
  with pytest.raises(ValueError, match=message):
    data.get_dataset(_seqio_config(task))


def test_one_vocabulary_for_both_features_keeps_the_byte_arrays():
  import seqio  # pylint: disable=g-import-not-at-top
  # Two equal instances (not the same object) are one vocabulary.
  task = _register("data_inputs_same_vocab", seqio.ByteVocabulary())
  ds = data.get_dataset(_seqio_config(task))
  assert ds.vocab_size == data.BYTE_VOCAB_SIZE
  _assert_arrays_equal(ds.train, _packed("train", NUM_TRAIN))
  _assert_arrays_equal(ds.test, _packed("validation", NUM_TEST))


def test_a_prompt_ending_in_eos_packs_as_prompt_answer_eos():
  """A T5-style Task (prompt feature add_eos=True, as the scale configs'
  super_glue_boolq_v102) packed "prompt EOS answer EOS"; the prompt's EOS is
  dropped, so the rows are the documented prompt + answer + EOS."""
  import seqio  # pylint: disable=g-import-not-at-top
  task = _register("data_inputs_prompt_eos", seqio.ByteVocabulary(), prompt_eos=True)
  ds = data.get_dataset(_seqio_config(task))
  _assert_arrays_equal(ds.train, _packed("train", NUM_TRAIN))
  _assert_arrays_equal(ds.test, _packed("validation", NUM_TEST))


def test_token_ids_outside_the_vocabulary_are_refused():
  small = _vocabularies()[2]
  task = _register("data_inputs_small_vocab", small(), small())
  with pytest.raises(ValueError, match=(
      r"^config.data.name='seqio': train example 0's inputs holds token id \d+, "
      r"outside the vocabulary of 100 ids\.$")):
    data.get_dataset(_seqio_config(task))


def test_check_lm_ids_refuses_negative_ids_and_keeps_valid_ones():
  arrays = {"inputs": np.array([[0, 3, 4]], np.int32),
            "targets": np.array([[3, 4, 1]], np.int32),
            "mask": np.ones((1, 3), np.float32)}
  ds = data.Dataset(name="x", kind="lm", train=arrays, test=arrays, vocab_size=5)
  dataset_lib.check_lm_ids(ds, "grain")  # ids 0..4 of 5: fine
  bad = dict(arrays, targets=np.array([[3, -1, 1]], np.int32))
  with pytest.raises(ValueError, match=(
      r"^config.data.name='grain': test example 0's targets holds token id -1, "
      r"outside the vocabulary of 5 ids\.$")):
    dataset_lib.check_lm_ids(
        data.Dataset(name="x", kind="lm", train=arrays, test=bad, vocab_size=5),
        "grain")


# ------------------------------------------------- 2. test slices of the train split


SLICED_SPLITS = ("train", "train[:4]", "train[:10]", "train[8:12]", "train[10:14]",
                 "validation")


def _sliced_task():
  """A Task over 16 train examples whose splits include slices of "train"."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    base, _, bounds = split.partition("[")
    offset = {"train": 0, "validation": 1000}[base]
    prompts = [f"question {offset + i}: what?" for i in range(16)]
    answers = [f" yes{i % 2}" for i in range(16)]
    if bounds:
      start, stop = (int(b) if b else None for b in bounds.rstrip("]").split(":"))
      prompts, answers = prompts[start:stop], answers[start:stop]
    return tf.data.Dataset.from_tensor_slices({"inputs": prompts, "targets": answers})

  name = "data_inputs_sliced"
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  byte = seqio.ByteVocabulary()
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset_fn, splits=SLICED_SPLITS),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"inputs": seqio.Feature(byte, add_eos=False),
                       "targets": seqio.Feature(byte, add_eos=True)})
  return name


def _sliced(**overrides):
  return data.get_dataset(_seqio_config(
      _sliced_task(), **{"num_train_examples": 10, "num_test_examples": 4,
                         **overrides}))


def test_a_test_slice_of_the_train_split_is_refused():
  with pytest.raises(ValueError, match=re.escape(
      "config.data.test_split='train[:4]': test examples [0, 1, 2, 3] (4 in all) are "
      "train examples of config.data.train_split='train' (slices of one split that "
      "overlap); choose disjoint slices.")):
    _sliced(train_split="train", test_split="train[:4]")
  with pytest.raises(ValueError, match=re.escape(
      "config.data.test_split='train[8:12]': test examples [0, 1] (2 in all)")):
    _sliced(train_split="train[:10]", test_split="train[8:12]")


def test_disjoint_slices_keep_their_rows():
  whole = _sliced(num_train_examples=14, train_split="train",
                  test_split="validation")
  sliced = _sliced(train_split="train[:10]", test_split="train[10:14]")
  for key in ("inputs", "targets", "mask"):
    np.testing.assert_array_equal(sliced.train[key], whole.train[key][:10])
    np.testing.assert_array_equal(sliced.test[key], whole.train[key][10:])


def test_other_splits_are_not_compared():
  """tfds.testing.mock_data generates the same examples for every split (as real
  benchmarks repeat a few texts across theirs): train and validation load."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _seqio_config(_rte_task(), num_train_examples=10, num_test_examples=4,
                         seq_len=256, test_split="validation")
  with tfds.testing.mock_data(num_examples=20):
    ds = data.get_dataset(config)
  np.testing.assert_array_equal(ds.test["targets"], ds.train["targets"][:4])


def _rte_task():
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  @seqio.map_over_dataset
  def to_text(ex):
    return {"inputs": tf.strings.join(["rte premise: ", ex["sentence1"],
                                       " hypothesis: ", ex["sentence2"]]),
            "targets": tf.where(ex["label"] == 0, "entailment", "not_entailment")}

  name = "data_inputs_rte"
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  byte = seqio.ByteVocabulary()
  seqio.TaskRegistry.add(
      name, source=seqio.TfdsDataSource("glue/rte:2.*.*"),
      preprocessors=[to_text, seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos],
      output_features={"inputs": seqio.Feature(byte, add_eos=False),
                       "targets": seqio.Feature(byte, add_eos=True)})
  return name


# ------------------------------------------------- 3. the answer as its own prompt


def test_the_answer_feature_as_prompt_is_refused():
  import seqio  # pylint: disable=g-import-not-at-top
  task = _register("data_inputs_same_feature", seqio.ByteVocabulary())
  message = (r"^config.data.prompt_feature='targets': the same feature as "
             r"config.data.answer_feature; the answer would be given in its own "
             r"prompt\.$")
  with pytest.raises(ValueError, match=message):
    data.get_dataset(_seqio_config(task, prompt_feature="targets"))
  grain = data.default_data_config()
  grain.update({"name": "grain", "grain_train": "a.array_record",
                "grain_test": "b.array_record", "prompt_feature": "targets"})
  with pytest.raises(ValueError, match=message):
    data.get_dataset(grain)
  # Swapped features are two features: read as given.
  ds = data.get_dataset(_seqio_config(task, prompt_feature="targets",
                                      answer_feature="inputs", seq_len=64))
  assert ds.num_train_examples == NUM_TRAIN


# ------------------------------------------------- 4. fields nothing reads


def _tiny(name="default"):
  return config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py:tiny"))


def test_an_unknown_data_field_is_refused():
  config = _tiny()
  config.data.seq_length = 64  # a config file's typo of seq_len
  with pytest.raises(ValueError, match=(
      r"^config.data.seq_length: not a field of the data config \(a typo\?\); "
      r"data.default_data_config\(\) lists them all\.$")):
    data.get_dataset(config)


@pytest.mark.parametrize("config_name,overrides,message", [
    ("default", {"seqio_task": "my_task"},
     "config.data.seqio_task='my_task': only read by config.data.name='seqio'; "
     "config.data.name='synthetic_facts' would ignore it (leave it at '', or set "
     "config.data.name)."),
    ("default", {"seqio_module": "my.module"},
     "config.data.seqio_module='my.module': only read by config.data.name='seqio'"),
    ("default", {"grain_train": "/data/train.array_record"},
     "config.data.grain_train='/data/train.array_record': only read by "
     "config.data.name='grain'; config.data.name='synthetic_facts'"),
    ("default", {"test_split": "test"},
     "config.data.test_split='test': only read by config.data.name='seqio'"),
    ("digits_mlp", {"pipeline": "seqio"},
     "config.data.pipeline='seqio': only read by config.data.name='synthetic_facts'; "
     "config.data.name='digits' would ignore it (leave it at 'numpy'"),
    ("digits_mlp", {"seq_len": 5},
     "config.data.seq_len=5: only read by config.data.name in ('synthetic_facts', "
     "'glue_rte', 'super_glue_copa', 'seqio', 'grain'); config.data.name='digits'"),
    ("digits_mlp", {"num_pretrain_examples": 100},
     "config.data.num_pretrain_examples=100: only read by "
     "config.data.name='synthetic_facts'"),
    ("glue_rte", {"prompt_feature": "question"},
     "config.data.prompt_feature='question': only read by config.data.name in "
     "('seqio', 'grain'); config.data.name='glue_rte'"),
    ("default", {"data_dir": "/tfds"},
     "config.data.data_dir='/tfds': only read by config.data.name in ('glue_rte', "
     "'super_glue_copa')"),
])
def test_a_field_the_source_ignores_is_refused(config_name, overrides, message):
  config = _tiny(config_name)
  config.data.update(overrides)
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    data.get_dataset(config)


@pytest.mark.parametrize("name", ["default", "digits_mlp", "glue_rte",
                                  "super_glue_copa", "scale_1b", "scale_8b"])
@pytest.mark.parametrize("arg", ["", ":tiny"])
def test_every_shipped_data_config_is_accepted(name, arg):
  if arg and name.startswith("scale"):
    arg = ":sgd" if name == "scale_1b" else ""  # the scale configs have no tiny
  config = config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py{arg}"))
  dataset_lib.check_data_config(config)


def test_fields_at_their_defaults_keep_the_digits_arrays():
  full = _tiny("digits_mlp")  # num_pretrain_examples=0 (tiny), the rest defaults
  config = ml_collections.ConfigDict()
  config.data = data.default_data_config()
  config.data.update(name="digits", num_train_examples=full.num_train_examples,
                     num_test_examples=full.num_test_examples)
  a, b = data.get_dataset(full), data.get_dataset(config)
  _assert_arrays_equal(a.train, b.train)
  _assert_arrays_equal(a.test, b.test)


# ------------------------------------------------- 5. .npy files of any name


def test_save_npy_to_any_name_and_corrupt_files_are_named(tmp_path):
  target = tmp_path / "scores.bin"
  array = np.arange(6.0).reshape(2, 3)
  _io.save_npy(target, array)
  assert os.listdir(tmp_path) == ["scores.bin"]
  np.testing.assert_array_equal(_io.load_npy(target, "reader"), array)
  np.testing.assert_array_equal(_io.load_npy(target, "reader", mmap=True), array)
  for name, content in (("empty.npy", b""),
                        ("cut_header.npy", target.read_bytes()[:100]),
                        ("cut_data.npy", target.read_bytes()[:-8])):
    (tmp_path / name).write_bytes(content)
    for mmap in (False, True):
      with pytest.raises(ValueError, match=(
          rf"^reader: '{re.escape(str(tmp_path / name))}' is corrupt")):
        _io.load_npy(tmp_path / name, "reader", mmap=mmap)
  np.savez(tmp_path / "archive.npz", a=array)
  os.replace(tmp_path / "archive.npz", tmp_path / "archive.npy")
  for mmap in (False, True):
    with pytest.raises(ValueError, match=r"'.*archive.npy' is an .npz archive"):
      _io.load_npy(tmp_path / "archive.npy", "reader", mmap=mmap)


def test_atomic_directory_keeps_a_users_old_sibling_and_reads_the_umask(tmp_path):
  """Replacing a directory never touches `<path>.old` (a user's folder or file
  of that name), and reading the umask does not change it, even for an instant."""
  target = tmp_path / "out"
  (tmp_path / "out.old").write_text("mine")
  for round_ in range(2):
    with _io.atomic_directory(target) as tmp:
      (pathlib.Path(tmp) / "x.txt").write_text(str(round_))
    assert (target / "x.txt").read_text() == str(round_)
  assert (tmp_path / "out.old").read_text() == "mine"
  assert sorted(os.listdir(tmp_path)) == ["out", "out.old"]
  previous = os.umask(0o027)
  try:
    calls = []
    original = os.umask
    with mock.patch.object(os, "umask", side_effect=lambda m: calls.append(m) or
                           original(m)):
      assert _io._umask() == 0o027  # pylint: disable=protected-access
    assert not calls or not sys.platform.startswith("linux")
  finally:
    os.umask(previous)
