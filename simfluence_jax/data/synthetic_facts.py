"""Synthetic key -> colour facts whose training examples really interact.

Every example is a prompt and an answer, e.g. `"zq7 is"` -> `" blue."`. Test examples
query one fact each in the canonical template. The train examples are built so that
the effect of one on another's loss is varied and partly predictable, which is what
training-run simulators and influence methods are supposed to recover:

* `fact`: the canonical statement of a tested fact (`"zq7 is blue."`); helps its test.
* `duplicate`: an exact extra copy of a `fact` (some facts get several, a "dose").
* `paraphrase`: the same fact in another template (`"the colour of zq7 is blue."`,
  `"zq7 has the colour blue."`), a near-duplicate; some tested facts have no
  canonical statement, only paraphrases (or nothing), as controls.
* `contradiction`: the tested key with another colour (`"zq7 is red."`); hurts.
* Tested facts come in sibling pairs whose keys share a 2-character prefix and whose
  colours differ (`zq7 -> blue`, `zqm -> teal`): learning one tends to hurt the other.
* `distractor`: untested keys; half share a tested prefix (interfering), half are
  unrelated; all shift the colour prior (shared values help tests with that colour).
* `filler`: irrelevant arithmetic (`"37 plus 48 is"` -> `" 85."`).

The pretrain split uses the same templates on keys whose prefixes never occur in the
train or test split, so a small model can learn the format before fine-tuning.

Everything is a pure function of (seed, sizes): no randomness outside
`np.random.default_rng([seed, stream])`.
"""

import dataclasses
import math
import string

import numpy as np

COLOURS = ("red", "blue", "green", "pink", "orange", "yellow", "white", "teal")
CANONICAL_TEMPLATE = "{key} is"
PARAPHRASE_TEMPLATES = ("the colour of {key} is", "{key} has the colour")
ANSWER_TEMPLATE = " {value}."
FILLER_TEMPLATE = "{a} plus {b} is"

# Keys are 3 characters: a letter, then two letters or digits. The first two form the
# prefix that sibling keys share.
_FIRST_CHARS = string.ascii_lowercase
_OTHER_CHARS = string.ascii_lowercase + string.digits
_ALL_PREFIXES = tuple(a + b for a in _FIRST_CHARS for b in _OTHER_CHARS)
# Share of prefixes reserved for the pretrain split (disjoint from fine-tuning keys).
_PRETRAIN_PREFIX_SHARE = 0.4
_FILLER_OPERANDS = range(10, 100)

# Composition of the train examples beyond one canonical fact per seen test fact.
_DUPLICATE_SHARE = 0.15
_PARAPHRASE_SHARE = 0.20
_CONTRADICTION_SHARE = 0.10
_DISTRACTOR_SHARE = 0.30
# The remainder is filler.
# Share of tested facts left without a canonical train statement (controls).
_UNSEEN_TEST_SHARE = 1 / 8
# Composition of the pretrain split.
_PRETRAIN_FACT_SHARE = 0.6
_PRETRAIN_PARAPHRASE_SHARE = 0.2

MAX_TEST_EXAMPLES = 512
MAX_TRAIN_EXAMPLES = 10_000
MAX_PRETRAIN_EXAMPLES = 10_000

# Independent random streams, so that e.g. changing N does not change the test facts.
_TEST_STREAM, _TRAIN_STREAM, _PRETRAIN_STREAM, _PREFIX_STREAM = range(4)

TRAIN_KINDS = ("fact", "duplicate", "paraphrase", "contradiction", "distractor",
               "filler")


@dataclasses.dataclass(frozen=True)
class Example:
  """One synthetic example.

  Attributes:
    prompt: text the model is conditioned on, e.g. "zq7 is".
    answer: text whose loss counts, e.g. " blue.".
    kind: one of TRAIN_KINDS, "test" or "pretrain_*".
    key: the fact's key, "" for filler.
    value: the stated colour (or the sum for filler).
    test_id: index of the test example this example states or contradicts, -1 if
      none.
  """
  prompt: str
  answer: str
  kind: str
  key: str = ""
  value: str = ""
  test_id: int = -1

  @property
  def text(self) -> str:
    return self.prompt + self.answer


@dataclasses.dataclass(frozen=True)
class SyntheticFacts:
  """The three splits and the metadata describing their interactions."""
  train: list
  test: list
  pretrain: list
  metadata: dict


def max_text_length() -> int:
  """Longest prompt + answer in bytes (ASCII), without EOS."""
  longest_value = max(len(c) for c in COLOURS)
  longest_prompt = max(
      len(t.format(key="xxx"))
      for t in (CANONICAL_TEMPLATE,) + PARAPHRASE_TEMPLATES)
  fact = longest_prompt + len(ANSWER_TEMPLATE.format(value="x" * longest_value))
  filler = len(FILLER_TEMPLATE.format(a=99, b=99)) + len(
      ANSWER_TEMPLATE.format(value=198))
  return max(fact, filler)


def _fact(key: str, value: str, kind: str, template: str, test_id: int = -1):
  return Example(prompt=template.format(key=key),
                 answer=ANSWER_TEMPLATE.format(value=value),
                 kind=kind, key=key, value=value, test_id=test_id)


def _fillers(pairs, kind: str) -> list:
  return [Example(prompt=FILLER_TEMPLATE.format(a=a, b=b),
                  answer=ANSWER_TEMPLATE.format(value=a + b),
                  kind=kind, value=str(a + b)) for a, b in pairs]


def _grouped_keys(rng: np.random.Generator, prefixes, num_keys: int,
                 keys_per_prefix: int) -> list:
  """`num_keys` distinct keys, `keys_per_prefix` consecutive ones per prefix."""
  keys = []
  for prefix in prefixes[:math.ceil(num_keys / keys_per_prefix)]:
    suffixes = rng.choice(len(_OTHER_CHARS), size=keys_per_prefix, replace=False)
    keys.extend(prefix + _OTHER_CHARS[s] for s in suffixes)
  return keys[:num_keys]


def _grouped_values(rng: np.random.Generator, num_keys: int,
                    keys_per_prefix: int) -> list:
  """Colours for `_grouped_keys`, distinct within a group where possible."""
  values = []
  for _ in range(math.ceil(num_keys / keys_per_prefix)):
    colours = rng.choice(len(COLOURS), size=keys_per_prefix,
                         replace=keys_per_prefix > len(COLOURS))
    values.extend(COLOURS[c] for c in colours)
  return values[:num_keys]


def _split_counts(total: int, shares) -> list:
  counts = [int(round(total * s)) for s in shares]
  return counts + [total - sum(counts)]


def generate(seed: int, num_train_examples: int, num_test_examples: int,
             num_pretrain_examples: int) -> SyntheticFacts:
  """Generates the synthetic facts deterministically from `seed`.

  Args:
    seed: non-negative integer.
    num_train_examples: N <= MAX_TRAIN_EXAMPLES.
    num_test_examples: M <= MAX_TEST_EXAMPLES.
    num_pretrain_examples: size of the pretrain split, <= MAX_PRETRAIN_EXAMPLES.

  Returns:
    The train (N), test (M) and pretrain examples, each in id order, and
    JSON-serialisable metadata: per train id its kind / key / value / test id,
    per test id its key / value / sibling, and per test id the supporting,
    contradicting and interfering (same-prefix distractor) train ids, plus the
    groups of identical train texts.
  """
  num_train, num_test = num_train_examples, num_test_examples
  prefix_rng = np.random.default_rng([seed, _PREFIX_STREAM])
  prefixes = [_ALL_PREFIXES[i] for i in prefix_rng.permutation(len(_ALL_PREFIXES))]
  num_pretrain_prefixes = int(len(prefixes) * _PRETRAIN_PREFIX_SHARE)
  pretrain_prefixes = prefixes[:num_pretrain_prefixes]
  num_test_prefixes = math.ceil(num_test / 2)
  test_prefixes = prefixes[num_pretrain_prefixes:][:num_test_prefixes]
  distractor_prefixes = prefixes[num_pretrain_prefixes + num_test_prefixes:]
  filler_pairs = [(a, b) for a in _FILLER_OPERANDS for b in _FILLER_OPERANDS]
  filler_order = prefix_rng.permutation(len(filler_pairs))

  # Test facts: sibling pairs, then shuffled so that ids carry no structure.
  test_rng = np.random.default_rng([seed, _TEST_STREAM])
  keys = _grouped_keys(test_rng, test_prefixes, num_test, 2)
  values = _grouped_values(test_rng, num_test, 2)
  order = test_rng.permutation(num_test)
  test_keys = [keys[i] for i in order]
  test_values = [values[i] for i in order]
  position = {old: new for new, old in enumerate(order)}
  test_sibling = []
  for old in order:
    partner = old ^ 1
    test_sibling.append(position[partner] if partner < num_test else -1)
  test = [_fact(k, v, "test", CANONICAL_TEMPLATE, m)
          for m, (k, v) in enumerate(zip(test_keys, test_values))]

  # Train examples.
  rng = np.random.default_rng([seed, _TRAIN_STREAM])
  num_unseen = int(num_test * _UNSEEN_TEST_SHARE)
  seen_tests = np.sort(rng.permutation(num_test)[:num_test - num_unseen])
  num_facts = min(num_train, len(seen_tests))
  seen_tests = seen_tests[:num_facts]
  n_dup, n_para, n_contra, n_distract, n_filler = _split_counts(
      num_train - num_facts,
      (_DUPLICATE_SHARE, _PARAPHRASE_SHARE, _CONTRADICTION_SHARE, _DISTRACTOR_SHARE))
  if n_contra > num_test:  # At most one contradiction per test fact.
    n_filler += n_contra - num_test
    n_contra = num_test

  train = [_fact(test_keys[m], test_values[m], "fact", CANONICAL_TEMPLATE, int(m))
           for m in seen_tests]
  if num_facts:
    for m in rng.choice(seen_tests, size=n_dup, replace=True):
      train.append(_fact(test_keys[m], test_values[m], "duplicate",
                         CANONICAL_TEMPLATE, int(m)))
  else:
    n_filler += n_dup
  for m in rng.choice(num_test, size=n_para, replace=True):
    template = PARAPHRASE_TEMPLATES[rng.integers(len(PARAPHRASE_TEMPLATES))]
    train.append(_fact(test_keys[m], test_values[m], "paraphrase", template, int(m)))
  for m in rng.choice(num_test, size=n_contra, replace=False):
    others = [c for c in COLOURS if c != test_values[m]]
    train.append(_fact(test_keys[m], others[rng.integers(len(others))],
                       "contradiction", CANONICAL_TEMPLATE, int(m)))
  # Distractors: half interfere with a tested prefix, half use fresh prefixes.
  used_keys = set(test_keys)
  interfering = [p + c for p in test_prefixes for c in _OTHER_CHARS
                 if p + c not in used_keys]
  fresh = [p + c for p in distractor_prefixes for c in _OTHER_CHARS]
  interfering = [interfering[i] for i in rng.permutation(len(interfering))]
  num_interfering = min(n_distract // 2, len(interfering))
  distractor_keys = (interfering[:num_interfering] + [
      fresh[i] for i in rng.choice(len(fresh), n_distract - num_interfering,
                                   replace=False)])
  for key in distractor_keys:
    template = (CANONICAL_TEMPLATE if rng.random() < 0.7 else
                PARAPHRASE_TEMPLATES[rng.integers(len(PARAPHRASE_TEMPLATES))])
    train.append(_fact(key, COLOURS[rng.integers(len(COLOURS))], "distractor",
                       template))
  train.extend(_fillers([filler_pairs[i] for i in filler_order[:n_filler]],
                        "filler"))
  train = [train[i] for i in rng.permutation(len(train))]

  # Pretrain split: same templates on disjoint prefixes, fillers from the other end
  # of the shuffled filler pool.
  pre_rng = np.random.default_rng([seed, _PRETRAIN_STREAM])
  n_pfact, n_ppara, n_pfiller = _split_counts(
      num_pretrain_examples, (_PRETRAIN_FACT_SHARE, _PRETRAIN_PARAPHRASE_SHARE))
  if n_pfact == 0:
    n_pfiller += n_ppara
    n_ppara = 0
  pre_prefixes = [pretrain_prefixes[i] for i in pre_rng.permutation(
      len(pretrain_prefixes))]
  # Several keys per prefix, so that the model must read the whole key.
  keys_per_prefix = max(2, math.ceil(n_pfact / len(pre_prefixes)))
  pre_keys = _grouped_keys(pre_rng, pre_prefixes, n_pfact, keys_per_prefix)
  pre_values = _grouped_values(pre_rng, n_pfact, keys_per_prefix)
  pretrain = [_fact(k, v, "pretrain_fact", CANONICAL_TEMPLATE)
              for k, v in zip(pre_keys, pre_values)]
  for i in pre_rng.choice(max(n_pfact, 1), size=n_ppara, replace=True):
    template = PARAPHRASE_TEMPLATES[pre_rng.integers(len(PARAPHRASE_TEMPLATES))]
    pretrain.append(_fact(pre_keys[i], pre_values[i], "pretrain_paraphrase",
                          template))
  pretrain.extend(_fillers(
      [filler_pairs[i] for i in filler_order[::-1][:n_pfiller]], "pretrain_filler"))
  pretrain = [pretrain[i] for i in pre_rng.permutation(len(pretrain))]

  return SyntheticFacts(train=train, test=test, pretrain=pretrain,
                        metadata=_metadata(train, test, test_sibling))


def _metadata(train, test, test_sibling) -> dict:
  """Who interacts with whom, as plain JSON-serialisable lists."""
  supporting = [[] for _ in test]
  contradicting = [[] for _ in test]
  for i, ex in enumerate(train):
    if ex.kind in ("fact", "duplicate", "paraphrase"):
      supporting[ex.test_id].append(i)
    elif ex.kind == "contradiction":
      contradicting[ex.test_id].append(i)
  same_prefix = [[i for i, ex in enumerate(train)
                  if ex.kind == "distractor" and ex.key[:2] == t.key[:2]]
                 for t in test]
  by_text = {}
  for i, ex in enumerate(train):
    by_text.setdefault(ex.text, []).append(i)
  duplicate_groups = sorted(ids for ids in by_text.values() if len(ids) > 1)
  return {
      "colours": list(COLOURS),
      "train_kind": [ex.kind for ex in train],
      "train_key": [ex.key for ex in train],
      "train_value": [ex.value for ex in train],
      "train_test_id": [ex.test_id for ex in train],
      "test_key": [ex.key for ex in test],
      "test_value": [ex.value for ex in test],
      "test_sibling": [int(s) for s in test_sibling],
      "supporting_train_ids": supporting,
      "contradicting_train_ids": contradicting,
      "interfering_train_ids": same_prefix,
      "duplicate_groups": duplicate_groups,
  }
