"""A user's own model and seqio Task, as a researcher would write them.

Imported by the main job through `config.model.factory` and
`config.data.seqio_module` (tests/user_model_test.py); nothing here is part of
simfluence_jax.
"""

import flax.linen as nn
import seqio
import tensorflow as tf

TASK = "user_project_copy_task"
# What a researcher edits between two jobs (tests/user_model_test.py swaps them).
ACTIVATION = nn.relu
KERNEL_INIT = nn.initializers.lecun_normal()


class TinyLM(nn.Module):
  """Embedding -> Dense -> logits: the smallest language model."""

  vocab_size: int
  width: int = 16

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab_size, self.width)(tokens)
    x = ACTIVATION(nn.Dense(self.width, kernel_init=KERNEL_INIT, name="hidden")(x))
    return nn.Dense(self.vocab_size, name="logits")(x)


def make_model(model_config, *, vocab_size, num_classes=None, max_len=None):
  del num_classes, max_len
  return TinyLM(vocab_size=vocab_size, width=model_config.get("width", 16))


class DropoutLM(TinyLM):
  """TinyLM with dropout on by default: a model the job cannot apply as it is."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab_size, self.width)(tokens)
    x = nn.Dropout(0.1, deterministic=False)(nn.Dense(self.width)(x))
    return nn.Dense(self.vocab_size)(x)


def make_dropout_model(model_config, *, vocab_size, num_classes=None, max_len=None):
  del model_config, num_classes, max_len
  return DropoutLM(vocab_size=vocab_size)


def _examples(split):
  count = {"train": 24, "validation": 8}[split]
  words = ["red", "blue", "green", "gold", "gray", "pink"]
  prompts = [f"w{i} {words[i % 6]} ->" for i in range(count)]
  answers = [f" {words[(i * 5 + 1) % 6]}" for i in range(count)]
  return prompts, answers


def _dataset_fn(split, shuffle_files, seed=None):
  del shuffle_files, seed
  prompts, answers = _examples(split)
  return tf.data.Dataset.from_tensor_slices({"inputs": prompts, "targets": answers})


if TASK in seqio.TaskRegistry.names():
  seqio.TaskRegistry.remove(TASK)
seqio.TaskRegistry.add(
    TASK, source=seqio.FunctionDataSource(_dataset_fn, splits=("train", "validation")),
    preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
    output_features={
        "inputs": seqio.Feature(seqio.ByteVocabulary(), add_eos=False),
        "targets": seqio.Feature(seqio.ByteVocabulary(), add_eos=True)})
