"""`Dataset`, the data config and `get_dataset`: examples with stable integer ids.

Row i of `Dataset.train` is train example id i: the same config and seed always give
the same rows, which is what curricula, traces and attribution scores index.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import ml_collections
import numpy as np

from simfluence_jax import _checks
from simfluence_jax.data import packing

LM_SOURCES = ("synthetic_facts", "glue_rte", "super_glue_copa", "seqio")
CLASSIFICATION_SOURCES = ("digits",)
# "grain": users' ArrayRecord files (data/grain_source.py); LM or classification
# as its decoder says.
SOURCES = LM_SOURCES + CLASSIFICATION_SOURCES + ("grain",)
BYTE_VOCAB_SIZE = 259  # seqio.ByteVocabulary: pad 0, EOS 1, UNK 2, bytes 3..258.
_NUM_DIGITS = 1797


def default_data_config() -> ml_collections.ConfigDict:
  """The `config.data` fields, with defaults for the synthetic workload."""
  config = ml_collections.ConfigDict()
  # One of SOURCES.
  config.name = "synthetic_facts"
  # N: train examples (ids 0..N-1).
  config.num_train_examples = 200
  # M: test examples whose losses are traced.
  config.num_test_examples = 32
  # L: tokens per LM example, prompt + answer + EOS (bytes); ignored for digits.
  config.seq_len = 32
  # Seeds the synthetic facts and the choice/split of real examples.
  config.seed = 0
  # TFDS data dir for glue_rte / super_glue_copa (None: TFDS default).
  config.data_dir = ml_collections.config_dict.placeholder(str)
  # Let TFDS download and prepare missing data (never in tests).
  config.tfds_download = False
  # synthetic_facts: size of the pretrain split (0: no pretrain split).
  config.num_pretrain_examples = 512
  # synthetic_facts: "numpy" (no TensorFlow) or "seqio" (its registered Task); equal arrays.
  config.pipeline = "numpy"
  # name="seqio": your registered seqio Task.
  config.seqio_task = ""
  # name="seqio": the module that registers it on import ("" = already registered).
  config.seqio_module = ""
  # name="seqio" / "grain": the feature holding the prompt text.
  config.prompt_feature = "inputs"
  # name="seqio" / "grain": the feature holding the answer (scored) text.
  config.answer_feature = "targets"
  # name="seqio": split the train examples are read from.
  config.train_split = "train"
  # name="seqio": split the test examples are read from.
  config.test_split = "validation"
  # name="grain": comma-separated ArrayRecord files of the train examples.
  config.grain_train = ""
  # name="grain": comma-separated ArrayRecord files of the test examples.
  config.grain_test = ""
  # name="grain": "" = JSON text records, or "pkg.module:fn" returning a Decoder.
  config.grain_decoder = ""
  # name="grain": grain worker processes (0 = decode in this process).
  config.grain_workers = 0
  return config


def _tasks(config):
  """data/tasks.py (seqio, TensorFlow, TFDS), or one line naming the seqio extra."""
  from simfluence_jax import _optional  # pylint: disable=g-import-not-at-top
  feature = (f"config.data.pipeline={config.pipeline!r}"
             if config.name == "synthetic_facts" else f"config.data.name={config.name!r}")
  return _optional.import_module("simfluence_jax.data.tasks", "seqio", feature)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Train, test and optional pretrain examples of one workload.

  Attributes:
    name: the source name, one of SOURCES.
    kind: "lm" or "classification".
    train: arrays with leading axis N; row i is train example id i. LM:
      {"inputs": int32[N, L], "targets": int32[N, L], "mask": float32[N, L]};
      classification: {"inputs": float32[N, D], "labels": int32[N]}.
    test: the same keys with leading axis M.
    pretrain: the same keys, data to pre-train the base model on, or None.
    train_texts: N strings (prompt + answer), or None.
    test_texts: M strings, or None.
    vocab_size: LM vocabulary size, None for classification.
    num_classes: classification classes, None for LM.
    metadata: JSON-serialisable description of the examples.
  """
  name: str
  kind: str
  train: dict
  test: dict
  pretrain: Optional[dict] = None
  train_texts: Optional[list] = None
  test_texts: Optional[list] = None
  vocab_size: Optional[int] = None
  num_classes: Optional[int] = None
  metadata: dict = dataclasses.field(default_factory=dict)

  @property
  def num_train_examples(self) -> int:
    return len(next(iter(self.train.values())))

  @property
  def num_test_examples(self) -> int:
    return len(next(iter(self.test.values())))


def _check_positive_int(name: str, value) -> int:
  if not _checks.is_int(value):
    raise ValueError(f"config.data.{name}={value!r}: must be an integer.")
  if value <= 0:
    raise ValueError(f"config.data.{name}={value!r}: must be positive.")
  return int(value)


def _too_many(name: str, value: int, source: str, available: int) -> ValueError:
  return ValueError(f"config.data.{name}={value}: {source} provides at most "
                    f"{available}.")


# The sources that read each source-specific `config.data` field. Under any other
# source the field must keep its default: `seqio_task='t'` with the default
# name='synthetic_facts' would otherwise train on the synthetic facts without a word.
_TFDS_SOURCES = ("glue_rte", "super_glue_copa")
_SOURCE_FIELDS = {
    "seq_len": LM_SOURCES + ("grain",),
    "num_pretrain_examples": ("synthetic_facts",),
    "pipeline": ("synthetic_facts",),
    "data_dir": _TFDS_SOURCES,
    "tfds_download": _TFDS_SOURCES,
    "seqio_task": ("seqio",),
    "seqio_module": ("seqio",),
    "prompt_feature": ("seqio", "grain"),
    "answer_feature": ("seqio", "grain"),
    "train_split": ("seqio",),
    "test_split": ("seqio",),
    "grain_train": ("grain",),
    "grain_test": ("grain",),
    "grain_decoder": ("grain",),
    "grain_workers": ("grain",),
}


def check_data_config(config) -> None:
  """Refuses, naming the field, a `config.data` field the data config does not have
  (a config file's typo: `config.data.seq_length`) and a source-specific field set
  while `config.data.name` selects a source that ignores it."""
  if "data" in config:
    config = config.data
  defaults = default_data_config()
  for key in defaults:
    if key not in config:
      raise ValueError(f"config.data.{key}: missing (start from "
                       "data.default_data_config()).")
  for key in config.keys():
    if key not in defaults:
      raise ValueError(f"config.data.{key}: not a field of the data config (a "
                       "typo?); data.default_data_config() lists them all.")
  if config.name not in SOURCES:
    raise ValueError(f"config.data.name={config.name!r}: unknown, expected one of "
                     f"{SOURCES}.")
  for key, sources in _SOURCE_FIELDS.items():
    value = config[key]
    # 0 pretrain examples (what `:tiny` sets for every source) is no pretrain split,
    # which is what every other source has.
    if (config.name in sources or value == defaults[key] or
        (key == "num_pretrain_examples" and value == 0)):
      continue
    readers = f"={sources[0]!r}" if len(sources) == 1 else f" in {sources}"
    raise ValueError(f"config.data.{key}={value!r}: only read by config.data.name"
                     f"{readers}; config.data.name={config.name!r} would ignore it "
                     f"(leave it at {defaults[key]!r}, or set config.data.name).")
  if config.pipeline not in ("numpy", "seqio"):
    raise ValueError(f"config.data.pipeline={config.pipeline!r}: must be 'numpy' or "
                     "'seqio'.")
  # (A grain decoder of the user's own may not read the two features.)
  reads_features = config.name == "seqio" or (config.name == "grain" and
                                              not config.grain_decoder)
  if reads_features and config.prompt_feature == config.answer_feature:
    raise ValueError(f"config.data.prompt_feature={config.prompt_feature!r}: the same "
                     "feature as config.data.answer_feature; the answer would be "
                     "given in its own prompt.")


def _data_config(config) -> ml_collections.ConfigDict:
  """Accepts the full config (with `.data`) or the data config itself."""
  if "data" in config:
    config = config.data
  check_data_config(config)
  for key in ("num_train_examples", "num_test_examples", "seq_len"):
    _check_positive_int(key, config[key])
  seed = config.seed
  if not _checks.is_int(seed) or seed < 0:
    raise ValueError(f"config.data.seed={seed!r}: must be a non-negative integer.")
  pretrain = config.num_pretrain_examples
  if not _checks.is_int(pretrain) or pretrain < 0:
    raise ValueError(f"config.data.num_pretrain_examples={pretrain!r}: must be a "
                     "non-negative integer.")
  return config


def get_dataset(config) -> Dataset:
  """Builds the dataset described by `config.data`.

  Args:
    config: a ConfigDict with a `data` sub-config (see `default_data_config`), or
      the data sub-config itself.

  Returns:
    A `Dataset` whose rows are the example ids.

  Raises:
    ValueError: naming the field, for an unknown name or field, a field the
      chosen source ignores (`check_data_config`), non-positive sizes, more
      examples than the source provides, a language-model example with no scored
      token (`check_lm_masks`) or a token id outside the vocabulary
      (`check_lm_ids`); for name="seqio", a prompt feature that is the answer
      feature or has another vocabulary, and test rows equal to train rows when
      both splits are slices of one split.
  """
  config = _data_config(config)
  if config.name == "digits":
    return _digits(config)
  if config.name == "synthetic_facts":
    dataset = _synthetic_facts(config)
  elif config.name == "seqio":
    dataset = _user_seqio_task(config)
  elif config.name == "grain":
    from simfluence_jax.data import grain_source  # pylint: disable=g-import-not-at-top
    dataset = grain_source.get_dataset(config)
  else:
    dataset = _tfds_lm(config)
  if dataset.kind == "lm":
    check_lm_masks(dataset, config.name)
    check_lm_ids(dataset, config.name)
  return dataset


def check_lm_ids(dataset: Dataset, source: str) -> None:
  """Refuses a token id outside 0..vocab_size-1: the embedding lookup would return
  NaN (or another token's row) for it, without an error."""
  for split in ("train", "test", "pretrain"):
    arrays = getattr(dataset, split)
    if arrays is None:
      continue
    for key in ("inputs", "targets"):
      ids = np.asarray(arrays[key])
      bad = (ids < 0) | (ids >= dataset.vocab_size)
      if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"config.data.name={source!r}: {split} example {row}'s "
                         f"{key} holds token id {int(ids[row, col])}, outside the "
                         f"vocabulary of {dataset.vocab_size} ids.")


def _base_splits(split: str) -> set:
  """The dataset splits a (TFDS-style) split spec reads: "train[:4]+validation" ->
  {"train", "validation"}."""
  return {part.split("[")[0].strip() for part in str(split).split("+")}


def _check_disjoint(train: dict, test: dict, train_split: str,
                    test_split: str) -> None:
  """Refuses test rows identical (inputs, targets and mask) to a train row."""
  def keys(arrays):
    return [b"".join(np.ascontiguousarray(arrays[k][i]).tobytes()
                     for k in ("inputs", "targets", "mask"))
            for i in range(len(arrays["inputs"]))]
  train_keys = set(keys(train))
  shared = [i for i, key in enumerate(keys(test)) if key in train_keys]
  if shared:
    raise ValueError(f"config.data.test_split={test_split!r}: test examples "
                     f"{shared[:5]}{' ...' if len(shared) > 5 else ''} "
                     f"({len(shared)} in all) are train examples of "
                     f"config.data.train_split={train_split!r} (slices of one split "
                     "that overlap); choose disjoint slices.")


def check_lm_masks(dataset: Dataset, source: str) -> None:
  """Refuses LM examples whose loss mask is negative, not finite, or all 0: a test
  example scored on no token has loss 0 whatever the curriculum, a train example
  trains nothing (a user's grain decoder can produce either). Refuses a split whose
  targets equal its inputs at every scored token too: a decoder that forgot to shift
  the targets by one, whose model learns to copy its input."""
  for split in ("train", "test", "pretrain"):
    arrays = getattr(dataset, split)
    if arrays is None:
      continue
    mask = np.asarray(arrays["mask"], np.float64)
    bad = ~np.isfinite(mask) | (mask < 0)
    if bad.any():
      row = int(np.argwhere(bad)[0][0])
      raise ValueError(f"config.data.name={source!r}: {split} example {row}'s mask "
                       "holds a negative or non-finite weight.")
    empty = np.flatnonzero(mask.reshape(len(mask), -1).sum(1) <= 0)
    if len(empty):
      raise ValueError(f"config.data.name={source!r}: {split} examples "
                       f"{empty[:5].tolist()}{' ...' if len(empty) > 5 else ''} "
                       f"({len(empty)} in all) have an empty loss mask (no token "
                       "scored).")
    inputs, targets = np.asarray(arrays["inputs"]), np.asarray(arrays["targets"])
    if inputs.shape == targets.shape and np.all((inputs == targets) | (mask == 0)):
      raise ValueError(f"config.data.name={source!r}: every {split} example's targets "
                       "equal its inputs at every scored token; the targets must be "
                       "the next tokens (inputs shifted by one).")


def _digits(config) -> Dataset:
  from simfluence_jax import _optional  # pylint: disable=g-import-not-at-top
  sk_datasets = _optional.import_module("sklearn.datasets", "digits",
                                        "config.data.name='digits'")
  num_train, num_test = config.num_train_examples, config.num_test_examples
  if num_train + num_test > _NUM_DIGITS:
    raise _too_many("num_train_examples", num_train,
                    f"digits (with num_test_examples={num_test})",
                    _NUM_DIGITS - num_test)
  digits = sk_datasets.load_digits()
  # Pixels are counts in 0..16.
  inputs = (digits.data / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng([config.seed, 0]).permutation(len(labels))
  # Train rows from the front of the order, test rows from its end: each split
  # depends on its own size only (the test set stays put when N changes, as in
  # the other sources; before 2026-12-07 it followed the train rows).
  train_rows, test_rows = order[:num_train], order[::-1][:num_test]
  return Dataset(
      name="digits", kind="classification",
      train={"inputs": inputs[train_rows], "labels": labels[train_rows]},
      test={"inputs": inputs[test_rows], "labels": labels[test_rows]},
      num_classes=10,
      metadata={"source": "sklearn.datasets.load_digits",
                "train_rows": train_rows.tolist(), "test_rows": test_rows.tolist()})


def _synthetic_facts(config) -> Dataset:
  from simfluence_jax.data import synthetic_facts  # pylint: disable=g-import-not-at-top
  for key, limit in (("num_train_examples", synthetic_facts.MAX_TRAIN_EXAMPLES),
                     ("num_test_examples", synthetic_facts.MAX_TEST_EXAMPLES),
                     ("num_pretrain_examples",
                      synthetic_facts.MAX_PRETRAIN_EXAMPLES)):
    if config[key] > limit:
      raise _too_many(key, config[key], "synthetic_facts", limit)
  needed = synthetic_facts.max_text_length() + 1  # + EOS
  if config.seq_len < needed:
    raise ValueError(f"config.data.seq_len={config.seq_len}: synthetic_facts needs "
                     f">= {needed} (longest example + EOS).")
  facts = synthetic_facts.generate(
      config.seed, config.num_train_examples, config.num_test_examples,
      config.num_pretrain_examples)
  arrays, texts = {}, {}
  splits = {"train": facts.train, "test": facts.test, "pretrain": facts.pretrain}
  if config.pipeline == "seqio":
    tasks = _tasks(config)
    task = tasks.register_synthetic_facts_task(facts)
  for split, examples in splits.items():
    if config.pipeline == "seqio":
      prompts, answers, texts[split] = tasks.materialize(task, split)
    else:
      prompts = [packing.tokenize_bytes(ex.prompt) for ex in examples]
      answers = [packing.tokenize_bytes(ex.answer, add_eos=True) for ex in examples]
      texts[split] = [ex.prompt + ex.answer for ex in examples]
    arrays[split] = packing.pack(prompts, answers, config.seq_len) if prompts else None
  metadata = {"source": "synthetic_facts", "pipeline": config.pipeline,
              "seed": int(config.seed), **facts.metadata}
  return Dataset(
      name="synthetic_facts", kind="lm", train=arrays["train"], test=arrays["test"],
      pretrain=arrays["pretrain"], train_texts=texts["train"],
      test_texts=texts["test"], vocab_size=BYTE_VOCAB_SIZE, metadata=metadata)


def _tfds_lm(config) -> Dataset:
  tasks = _tasks(config)
  task_name = {"glue_rte": tasks.GLUE_RTE_TASK,
               "super_glue_copa": tasks.SUPER_GLUE_COPA_TASK}[config.name]
  task = tasks.register_tfds_task(task_name, config.data_dir,
                                  download=bool(config.tfds_download))
  splits = {}
  for split, key, rng_stream in (("train", "num_train_examples", 1),
                                 ("validation", "num_test_examples", 2)):
    try:
      prompts, answers, texts = tasks.materialize(task, split, tasks.has_label)
    except AssertionError as e:  # TFDS: "Dataset glue: could not find data in ..."
      if "could not find data" not in str(e):
        raise
      raise ValueError(
          f"config.data.name={config.name!r}: TFDS found no prepared data "
          f"(config.data.data_dir={config.data_dir!r}): point data_dir at it, or set "
          "config.data.tfds_download=True to download it.") from None
    wanted = config[key]
    if wanted > len(prompts):
      raise _too_many(key, wanted, f"{config.name} split {split!r}", len(prompts))
    rows = np.random.default_rng([config.seed, rng_stream]).permutation(
        len(prompts))[:wanted]
    splits[split] = (
        tasks.pack([prompts[i] for i in rows], [answers[i] for i in rows],
                   config.seq_len),
        [texts[i] for i in rows], rows.tolist())
  return Dataset(
      name=config.name, kind="lm", train=splits["train"][0],
      test=splits["validation"][0], train_texts=splits["train"][1],
      test_texts=splits["validation"][1], vocab_size=BYTE_VOCAB_SIZE,
      metadata={"source": config.name, "seqio_task": task_name,
                "seed": int(config.seed), "test_split": "validation",
                "train_source_rows": splits["train"][2],
                "test_source_rows": splits["validation"][2]})


def _user_seqio_task(config) -> Dataset:
  """A user's registered seqio Task: the first N / M examples of its splits.

  The prompt and answer features (`config.data.prompt_feature` / `answer_feature`)
  are taken tokenized by the Task's own vocabulary and packed decoder-only (the
  loss is on the answer tokens); the vocabulary size comes from the Task, and both
  features must share it (`tasks.shared_vocabulary`).
  """
  import importlib  # pylint: disable=g-import-not-at-top
  tasks = _tasks(config)
  if not config.seqio_task:
    raise ValueError("config.data.seqio_task: name the registered seqio Task "
                     "(config.data.name='seqio').")
  if config.seqio_module:
    try:
      importlib.import_module(config.seqio_module)
    except ImportError as e:
      raise ValueError(f"config.data.seqio_module={config.seqio_module!r}: cannot be "
                       f"imported ({e}).") from e
  task = tasks.get_task(config.seqio_task)
  features = (config.prompt_feature, config.answer_feature)
  missing = [f for f in features if f not in task.output_features]
  if missing:
    raise ValueError(f"config.data.prompt_feature/answer_feature: {missing} are not "
                     f"output features of {config.seqio_task!r} "
                     f"({sorted(task.output_features)}).")
  vocab = tasks.shared_vocabulary(task, *features)
  if config.test_split == config.train_split:
    raise ValueError(f"config.data.test_split={config.test_split!r}: the same split "
                     "as config.data.train_split; the test examples would be train "
                     "examples 0..M-1.")
  arrays, texts = {}, {}
  for split, key in ((config.train_split, "num_train_examples"),
                     (config.test_split, "num_test_examples")):
    prompts, answers, split_texts = tasks.materialize(task, split, features=features)
    if config[key] > len(prompts):
      raise _too_many(key, config[key], f"{config.seqio_task} split {split!r}",
                      len(prompts))
    count = config[key]
    arrays[key] = packing.pack(prompts[:count], answers[:count], config.seq_len)
    texts[key] = split_texts[:count]
  if _base_splits(config.train_split) & _base_splits(config.test_split):
    # Slices of one split ("train" and "train[:4]"): the user's partition, so a test
    # row equal to a train row means the slices overlap (or the split repeats an
    # example across them: that test example is trained on all the same). Splits
    # that are different splits of the dataset are its own partition and are not
    # compared: real benchmarks repeat a few texts across them, and
    # tfds.testing.mock_data generates the same examples for every split, so
    # refusing there would refuse valid data.
    _check_disjoint(arrays["num_train_examples"], arrays["num_test_examples"],
                    config.train_split, config.test_split)
  return Dataset(
      name=config.seqio_task, kind="lm", train=arrays["num_train_examples"],
      test=arrays["num_test_examples"], train_texts=texts["num_train_examples"],
      test_texts=texts["num_test_examples"], vocab_size=int(vocab.vocab_size),
      metadata={"source": "seqio", "seqio_task": config.seqio_task,
                "splits": [config.train_split, config.test_split]})
