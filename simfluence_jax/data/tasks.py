"""seqio Tasks of the LM workloads and their materialisation to numpy arrays.

Each task maps an example to a `prompt` and an `answer` string, tokenizes both with
the byte vocabulary (no vocabulary file) and appends EOS to the answer. The arrays are
then packed decoder-only: `targets = prompt + answer + EOS` (truncated to L, keeping
the answer), `inputs` = targets shifted right with 0 as the start token, and `mask`
= 1 on the answer and EOS positions only.

Registration replaces a task of the same name, so calling it again (e.g. with
another seed or data_dir) never raises "already registered".
"""


import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from simfluence_jax.data import packing
from simfluence_jax.data import synthetic_facts

SYNTHETIC_FACTS_TASK = "simfluence_synthetic_facts"
GLUE_RTE_TASK = "simfluence_glue_rte"
SUPER_GLUE_COPA_TASK = "simfluence_super_glue_copa"
pack = packing.pack  # re-exported: the seqio path and the numpy path pack alike


def vocabulary() -> seqio.ByteVocabulary:
  return seqio.ByteVocabulary()


def _output_features():
  vocab = vocabulary()
  return {
      "prompt": seqio.Feature(vocab, add_eos=False),
      "answer": seqio.Feature(vocab, add_eos=True),
  }


def _register(name: str, source: seqio.DataSource, preprocessors) -> seqio.Task:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=list(preprocessors) + [
          seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features=_output_features())


def register_synthetic_facts_task(facts: synthetic_facts.SyntheticFacts) -> seqio.Task:
  """(Re)registers SYNTHETIC_FACTS_TASK over already generated facts."""
  splits = {"train": facts.train, "test": facts.test, "pretrain": facts.pretrain}

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # The order is the id order.
    examples = splits[split]
    return tf.data.Dataset.from_tensor_slices({
        "prompt": tf.constant([ex.prompt for ex in examples], tf.string),
        "answer": tf.constant([ex.answer for ex in examples], tf.string),
    })

  source = seqio.FunctionDataSource(
      dataset_fn, splits=tuple(splits),
      num_input_examples={k: len(v) for k, v in splits.items()})
  return _register(SYNTHETIC_FACTS_TASK, source, [])


@seqio.map_over_dataset
def _rte_to_prompt_answer(ex):
  return {
      "prompt": tf.strings.join(["rte premise: ", ex["sentence1"], " hypothesis: ",
                                 ex["sentence2"], " answer:"]),
      "answer": tf.where(ex["label"] == 0, " entailment", " not_entailment"),
      "label": ex["label"],
  }


@seqio.map_over_dataset
def _copa_to_prompt_answer(ex):
  return {
      "prompt": tf.strings.join([
          "copa premise: ", ex["premise"], " what was the ", ex["question"],
          "? choice1: ", ex["choice1"], " choice2: ", ex["choice2"], " answer:"]),
      "answer": tf.strings.join(
          [" ", tf.where(ex["label"] == 0, ex["choice1"], ex["choice2"])]),
      "label": ex["label"],
  }


def register_tfds_task(name: str, data_dir, download: bool = False) -> seqio.Task:
  """(Re)registers GLUE_RTE_TASK or SUPER_GLUE_COPA_TASK reading from `data_dir`."""
  tfds_name, preprocessor = {
      GLUE_RTE_TASK: ("glue/rte:2.*.*", _rte_to_prompt_answer),
      SUPER_GLUE_COPA_TASK: ("super_glue/copa:1.*.*", _copa_to_prompt_answer),
  }[name]
  source = seqio.TfdsDataSource(
      tfds_name, tfds_data_dir=data_dir, splits=("train", "validation"),
      read_only=not download)
  return _register(name, source, [preprocessor])


def get_task(name: str) -> seqio.Task:
  """The registered seqio Task `name`; ValueError naming it if there is none."""
  if name not in seqio.TaskRegistry.names():
    raise ValueError(f"config.data.seqio_task={name!r}: no such seqio Task is "
                     "registered (set config.data.seqio_module to the module that "
                     "registers it).")
  return seqio.get_mixture_or_task(name)


def shared_vocabulary(task: seqio.Task, prompt_feature: str,
                      answer_feature: str) -> seqio.Vocabulary:
  """The vocabulary of both the prompt and the answer feature of `task`.

  They are packed into one token sequence read through one embedding, whose size is
  the answer vocabulary's: a prompt in another vocabulary would be read through the
  wrong rows (or past the end of the table). Equal means the same class and equal
  by the class's `__eq__` (seqio's ByteVocabulary compares equal to any subclass).

  Raises:
    ValueError: naming config.data.prompt_feature, if the vocabularies differ.
  """
  prompt = task.output_features[prompt_feature].vocabulary
  answer = task.output_features[answer_feature].vocabulary
  same_class = type(prompt) is type(answer)  # pylint: disable=unidiomatic-typecheck
  if prompt is not answer and not (same_class and prompt == answer == prompt):
    raise ValueError(
        f"config.data.prompt_feature={prompt_feature!r}: its vocabulary "
        f"({type(prompt).__name__}, {prompt.vocab_size} ids) is not the vocabulary "
        f"of config.data.answer_feature={answer_feature!r} "
        f"({type(answer).__name__}, {answer.vocab_size} ids); both are read through "
        f"one embedding, so Task {task.name!r} must tokenize them alike.")
  return answer


def materialize(task: seqio.Task, split: str, keep_fn=None,
                features=("prompt", "answer")):
  """Reads a whole split in order: (prompt ids, answer ids, prompt+answer texts).

  `features` names the Task's prompt and answer features; an answer without an
  EOS (a Task whose feature does not add one) gets the vocabulary's EOS appended,
  so every answer ends like the built-in tasks' do, and a prompt's trailing EOS (a
  T5-style Task whose prompt feature has `add_eos=True`, e.g. super_glue_*_v102) is
  dropped: the row is prompt + answer + EOS, with no EOS between them.
  """
  prompt_key, answer_key = features
  # No in-memory cache: it would ask the source for its size, which mocked (and
  # not yet prepared) TFDS datasets do not know; each split is read once anyway.
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False,
                             use_cached=False, seed=0, try_in_mem_cache=False)
  prompts, answers, texts = [], [], []
  for ex in tfds.as_numpy(dataset):
    if keep_fn is not None and not keep_fn(ex):
      continue
    answer = np.asarray(ex[answer_key])
    eos = task.output_features[answer_key].vocabulary.eos_id
    if eos is not None and (not len(answer) or answer[-1] != eos):
      answer = np.concatenate([answer, [eos]])
    prompt = np.asarray(ex[prompt_key])
    prompt_eos = task.output_features[prompt_key].vocabulary.eos_id
    if prompt_eos is not None and len(prompt) and prompt[-1] == prompt_eos:
      prompt = prompt[:-1]
    prompts.append(prompt)
    answers.append(answer)
    texts.append(_text(ex, prompt_key, task) + _text(ex, answer_key, task))
  return prompts, answers, texts


def _text(ex, key, task) -> str:
  raw = ex.get(key + "_pretokenized")
  if raw is not None:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
  return task.output_features[key].vocabulary.decode([int(t) for t in ex[key]])


def has_label(ex) -> bool:
  """Drops unlabelled examples (TFDS test splits use label -1)."""
  return ex["label"] >= 0
