"""Decoder-only packing and byte tokenization, without TensorFlow.

`seqio.ByteVocabulary` maps text to its UTF-8 bytes shifted by 3 (0 = pad, 1 = EOS,
2 = UNK); `tokenize_bytes` does the same in numpy, so the generated default task
needs neither seqio nor TensorFlow (the seqio Task in `tasks.py` gives identical
arrays; `tests/data_test.py` checks it).
"""

import numpy as np

EOS_ID = 1
_BYTE_OFFSET = 3
# Share of a too-long prompt's budget kept from its start; the rest is kept from its
# end, where the hypothesis / choices and "answer:" are.
_PROMPT_HEAD_SHARE = 1 / 3


def tokenize_bytes(text: str, add_eos: bool = False) -> np.ndarray:
  """int32 ids of `text` in the byte vocabulary (EOS appended if `add_eos`)."""
  ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + _BYTE_OFFSET
  return np.concatenate([ids, [EOS_ID]]).astype(np.int32) if add_eos else ids


def _truncate_middle(prompt: np.ndarray, budget: int) -> np.ndarray:
  if len(prompt) <= budget:
    return prompt
  head = int(budget * _PROMPT_HEAD_SHARE)
  return np.concatenate([prompt[:head], prompt[len(prompt) - (budget - head):]])


def pack(prompts, answers, seq_len: int) -> dict:
  """Packs token sequences into decoder-only LM arrays.

  Args:
    prompts: n int sequences (no EOS).
    answers: n int sequences ending with EOS.
    seq_len: L.

  Returns:
    {"inputs": int32[n, L], "targets": int32[n, L], "mask": float32[n, L]}. A
    prompt too long for what the answer leaves is cut in its middle.

  Raises:
    ValueError: an answer that does not fit in L, or leaves no room for any of its
      prompt (the loss would be on a cut answer, or on an answer given nothing).
  """
  num = len(prompts)
  targets = np.zeros((num, seq_len), np.int32)
  mask = np.zeros((num, seq_len), np.float32)
  for i, (prompt, answer) in enumerate(zip(prompts, answers)):
    answer, prompt = np.asarray(answer), np.asarray(prompt)
    if len(answer) > seq_len or (len(prompt) and len(answer) >= seq_len):
      raise ValueError(
          f"config.data.seq_len={seq_len}: example {i}'s answer has {len(answer)} "
          f"tokens (with EOS) and its prompt {len(prompt)}; the answer would be cut "
          "or its whole prompt dropped. Raise config.data.seq_len.")
    prompt = _truncate_middle(prompt, seq_len - len(answer))
    tokens = np.concatenate([prompt, answer])
    targets[i, :len(tokens)] = tokens
    mask[i, len(prompt):len(tokens)] = 1.0
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  return {"inputs": inputs, "targets": targets, "mask": mask}
