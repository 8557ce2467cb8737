"""Tests of simfluence_jax.data: synthetic facts, TFDS tasks (mocked), digits, curricula."""

import functools
import json
import math

import numpy as np
import pytest

from simfluence_jax import data


def _config(**overrides):
  config = data.default_data_config()
  config.update(overrides)
  return config


@functools.lru_cache(maxsize=None)
def _synthetic(seed=0):
  return data.get_dataset(_config(seed=seed))


def _decode(tokens):
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio.ByteVocabulary().decode([int(t) for t in tokens])


# ---------------------------------------------------------------- synthetic facts


def test_synthetic_shapes_and_dtypes():
  ds = _synthetic()
  assert ds.kind == "lm" and ds.name == "synthetic_facts"
  assert ds.vocab_size == 259 and ds.num_classes is None
  for split, n in ((ds.train, 200), (ds.test, 32), (ds.pretrain, 512)):
    assert split["inputs"].shape == split["targets"].shape == (n, 32)
    assert split["mask"].shape == (n, 32)
    assert split["inputs"].dtype == np.int32 and split["targets"].dtype == np.int32
    assert split["mask"].dtype == np.float32
    assert np.all(split["mask"].sum(axis=1) > 0)
    # inputs are the targets shifted right behind a 0 start token.
    np.testing.assert_array_equal(split["inputs"][:, 1:], split["targets"][:, :-1])
    assert np.all(split["inputs"][:, 0] == 0)
  assert len(ds.train_texts) == 200 and len(ds.test_texts) == 32
  json.dumps(ds.metadata)


def test_synthetic_fits_and_ends_with_eos():
  ds = _synthetic()
  for split in (ds.train, ds.test, ds.pretrain):
    lengths = (split["targets"] != 0).sum(axis=1)
    assert np.all(lengths < 32)
    eos = split["targets"][np.arange(len(lengths)), lengths - 1]
    assert np.all(eos == 1)


def test_synthetic_mask_covers_exactly_the_answer():
  ds = _synthetic()
  for split, texts in ((ds.train, ds.train_texts), (ds.test, ds.test_texts)):
    for i in range(0, len(texts), 7):
      mask = split["mask"][i] > 0
      positions = np.flatnonzero(mask)
      assert np.all(np.diff(positions) == 1)  # contiguous
      answer = _decode(split["targets"][i][mask])
      prompt = _decode(split["targets"][i][:positions[0]])
      assert prompt + answer == texts[i]
      assert answer.startswith(" ") and answer.endswith(".")
      assert split["targets"][i][positions[-1]] == 1  # EOS is part of the answer.
  # Test examples query a fact: prompt "key is", answer " colour.".
  for m, text in enumerate(ds.test_texts):
    assert text == f"{ds.metadata['test_key'][m]} is {ds.metadata['test_value'][m]}."


def test_pack_cuts_a_long_prompt_in_its_middle_and_refuses_a_long_answer():
  from simfluence_jax.data import packing  # pylint: disable=g-import-not-at-top
  prompt, answer = np.arange(10, 22), np.array([30, 31, 1])  # 12 + 3 tokens
  row = packing.pack([prompt], [answer], 8)
  # 5 prompt tokens kept (1 from its start, 4 from its end), then the whole answer.
  np.testing.assert_array_equal(row["targets"][0], [10, 18, 19, 20, 21, 30, 31, 1])
  np.testing.assert_array_equal(row["mask"][0], [0, 0, 0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(row["inputs"][0], [0, 10, 18, 19, 20, 21, 30, 31])
  # An answer that fills L exactly is kept when there is no prompt to drop.
  row = packing.pack([np.zeros(0, np.int32)], [np.arange(5, 13)], 8)
  np.testing.assert_array_equal(row["mask"][0], np.ones(8))
  # Refused: an answer cut (EOS lost), or one leaving no room for its prompt.
  for prompt, answer in ((np.zeros(0, np.int32), np.arange(5, 14)),
                         (np.array([4]), np.arange(5, 13))):
    with pytest.raises(ValueError, match=(
        rf"^config.data.seq_len=8: example 1's answer has {len(answer)} tokens "
        rf"\(with EOS\) and its prompt {len(prompt)}; the answer would be cut")):
      packing.pack([np.array([4]), prompt], [np.array([5, 1]), answer], 8)


def test_synthetic_is_deterministic_and_seed_dependent():
  a, b = _synthetic(0), data.get_dataset(_config(seed=0))
  for key in a.train:
    np.testing.assert_array_equal(a.train[key], b.train[key])
    np.testing.assert_array_equal(a.test[key], b.test[key])
  assert a.train_texts == b.train_texts
  c = _synthetic(1)
  assert a.train_texts != c.train_texts
  assert not np.array_equal(a.train["targets"], c.train["targets"])


def test_synthetic_interactions_in_metadata_exist_in_texts():
  ds = _synthetic()
  meta, texts = ds.metadata, ds.train_texts
  kinds = meta["train_kind"]
  for kind in ("fact", "duplicate", "paraphrase", "contradiction", "distractor",
               "filler"):
    assert kind in kinds, kind
  assert meta["duplicate_groups"]
  for group in meta["duplicate_groups"]:
    assert len(group) > 1 and len({texts[i] for i in group}) == 1
  num_contradicted = 0
  for m, (key, value) in enumerate(zip(meta["test_key"], meta["test_value"])):
    for i in meta["supporting_train_ids"][m]:
      assert key in texts[i] and texts[i].endswith(f" {value}.")
    for i in meta["contradicting_train_ids"][m]:
      num_contradicted += 1
      assert texts[i].startswith(f"{key} is ") and not texts[i].endswith(f" {value}.")
    for i in meta["interfering_train_ids"][m]:
      other = meta["train_key"][i]
      assert other[:2] == key[:2] and other != key and f"{other} " in texts[i]
    sibling = meta["test_sibling"][m]
    if sibling >= 0:
      assert meta["test_key"][sibling][:2] == key[:2]
      assert meta["test_value"][sibling] != value
      assert meta["test_sibling"][sibling] == m
  assert num_contradicted > 0
  # Pretrain keys never share a prefix with fine-tuning keys.
  finetune_prefixes = {k[:2] for k in meta["train_key"] + meta["test_key"] if k}
  pretrain_texts = [_decode(t) for t in ds.pretrain["targets"]]
  for text in pretrain_texts:
    if "plus" not in text:
      key = text.split()[3] if text.startswith("the colour of") else text.split()[0]
      assert key[:2] not in finetune_prefixes, text


# ---------------------------------------------------------------- TFDS tasks


def test_tfds_data_not_prepared_is_named(tmp_path):
  """TFDS's raw AssertionError ("could not find data in ...") becomes one line
  naming config.data.data_dir and tfds_download (never downloads here)."""
  with pytest.raises(ValueError, match=(
      r"^config.data.name='glue_rte': TFDS found no prepared data "
      r"\(config.data.data_dir='.*'\): point data_dir at it, or set "
      r"config.data.tfds_download=True")):
    data.get_dataset(_config(name="glue_rte", num_train_examples=4,
                             num_test_examples=2, seq_len=48,
                             data_dir=str(tmp_path)))


@pytest.mark.parametrize("name,answers", [
    ("glue_rte", (" entailment", " not_entailment")),
    ("super_glue_copa", None),
])
def test_tfds_tasks_with_mock_data(name, answers):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=20):
    ds = data.get_dataset(_config(name=name, num_train_examples=12,
                                  num_test_examples=5, seq_len=48))
    again = data.get_dataset(_config(name=name, num_train_examples=12,
                                     num_test_examples=5, seq_len=48))
    with pytest.raises(ValueError, match="num_train_examples=21"):
      data.get_dataset(_config(name=name, num_train_examples=21))
  assert ds.kind == "lm" and ds.vocab_size == 259
  assert ds.train["inputs"].shape == (12, 48) and ds.test["targets"].shape == (5, 48)
  np.testing.assert_array_equal(ds.train["targets"], again.train["targets"])
  for split in (ds.train, ds.test):
    assert split["mask"].dtype == np.float32
    assert np.all(split["mask"].sum(axis=1) > 0)
    for i in range(len(split["mask"])):
      # Prompts were truncated, never the answer: the row ends with answer + EOS.
      answer = _decode(split["targets"][i][split["mask"][i] > 0])
      assert answer.startswith(" ")
      if answers:
        assert answer in answers
  assert len(ds.train_texts) == 12


# ---------------------------------------------------------------- digits


def test_digits():
  ds = data.get_dataset(_config(name="digits", num_train_examples=300,
                                num_test_examples=100, seed=3))
  assert ds.kind == "classification" and ds.num_classes == 10
  assert ds.train["inputs"].shape == (300, 64) and ds.train["inputs"].dtype == np.float32
  assert ds.test["inputs"].shape == (100, 64) and ds.test["labels"].shape == (100,)
  assert ds.train["labels"].dtype == np.int32
  assert 0 <= ds.train["labels"].min() and ds.train["labels"].max() <= 9
  assert 0.0 <= ds.train["inputs"].min() and ds.train["inputs"].max() <= 1.0
  train_rows, test_rows = ds.metadata["train_rows"], ds.metadata["test_rows"]
  assert not set(train_rows) & set(test_rows)
  again = data.get_dataset(_config(name="digits", num_train_examples=300,
                                   num_test_examples=100, seed=3))
  np.testing.assert_array_equal(ds.train["inputs"], again.train["inputs"])
  other = data.get_dataset(_config(name="digits", num_train_examples=300,
                                   num_test_examples=100, seed=4))
  assert other.metadata["train_rows"] != train_rows
  # Each split depends on its own size: the test set stays when N changes (it
  # became train rows at a larger N), and the train rows keep their prefix.
  larger = data.get_dataset(_config(name="digits", num_train_examples=1000,
                                    num_test_examples=100, seed=3))
  assert larger.metadata["test_rows"] == test_rows
  assert larger.metadata["train_rows"][:300] == train_rows
  np.testing.assert_array_equal(larger.test["labels"], ds.test["labels"])


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize("overrides,field", [
    (dict(name="mnist"), "config.data.name='mnist'"),
    (dict(num_train_examples=0), "config.data.num_train_examples=0"),
    (dict(num_test_examples=-1), "config.data.num_test_examples=-1"),
    (dict(seq_len=0), "config.data.seq_len=0"),
    (dict(seq_len=8), "config.data.seq_len=8"),
    (dict(seed=-1), "config.data.seed=-1"),
    (dict(num_pretrain_examples=-2), "config.data.num_pretrain_examples=-2"),
    (dict(num_train_examples=10**6), "config.data.num_train_examples=1000000"),
    (dict(name="digits", num_train_examples=1790), "num_train_examples=1790"),
])
def test_bad_config_raises(overrides, field):
  with pytest.raises(ValueError) as error:
    data.get_dataset(_config(**overrides))
  assert field in str(error.value)


def test_accepts_full_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict()
  config.data = _config(name="digits", num_train_examples=10, num_test_examples=5)
  assert data.get_dataset(config).num_train_examples == 10


# ---------------------------------------------------------------- curricula


def test_curricula_shape_and_epochs():
  num_train, subset, epochs, batch = 200, 128, 3, 10
  curricula = data.make_curricula(4, num_train, subset, epochs, batch, seed=0)
  steps = math.ceil(subset / batch)
  assert curricula.shape == (4, epochs * steps, batch)
  assert curricula.dtype == np.int32
  for run in curricula:
    epoch_sets = []
    for epoch in range(epochs):
      flat = run[epoch * steps:(epoch + 1) * steps].reshape(-1)
      # Padding only at the end of the epoch's last batch.
      assert np.all(flat[:subset] >= 0) and np.all(flat[subset:] == -1)
      assert len(set(flat[:subset].tolist())) == subset
      epoch_sets.append(sorted(flat[:subset].tolist()))
    assert all(s == epoch_sets[0] for s in epoch_sets)  # permutations of one subset
    assert max(epoch_sets[0]) < num_train
    assert not np.array_equal(run[:steps], run[steps:2 * steps])  # reshuffled


def test_curricula_reproducible_and_extensible():
  a = data.make_curricula(3, 50, 20, 2, 8, seed=7)
  np.testing.assert_array_equal(a, data.make_curricula(3, 50, 20, 2, 8, seed=7))
  more = data.make_curricula(5, 50, 20, 2, 8, seed=7)
  np.testing.assert_array_equal(more[:3], a)
  held_out = data.make_curricula(2, 50, 20, 2, 8, seed=7, first_run=3)
  np.testing.assert_array_equal(held_out, more[3:])
  assert not np.array_equal(a[0], a[1])
  assert not np.array_equal(a, data.make_curricula(3, 50, 20, 2, 8, seed=8))


def test_curricula_exact_batches_have_no_padding():
  curricula = data.make_curricula(2, 16, 16, 2, 4, seed=0)
  assert curricula.shape == (2, 8, 4) and np.all(curricula >= 0)


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_runs=0), "num_runs"),
    (dict(num_train_examples=0), "num_train_examples"),
    (dict(subset_size=0), "subset_size"),
    (dict(subset_size=300), "subset_size"),
    (dict(num_epochs=0), "num_epochs"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(seed=-1), "seed"),
    (dict(first_run=-1), "first_run"),
])
def test_curricula_bad_arguments(kwargs, name):
  arguments = dict(num_runs=2, num_train_examples=200, subset_size=128,
                   num_epochs=2, batch_size=8, seed=0)
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=name):
    data.make_curricula(**arguments)
