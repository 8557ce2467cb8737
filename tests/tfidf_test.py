"""TF-IDF candidate filtering against an explicit-loop reference and planted matches."""

import collections
import math

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import influence


def _reference(queries, candidates, ngram=1, query_mask=None, candidate_mask=None,
               sublinear_tf=False):
  """Cosine TF-IDF with Python dicts over n-gram tuples (fitted on candidates)."""

  def grams(tokens, mask):
    counts = collections.Counter()
    for order in range(1, ngram + 1):
      for start in range(len(tokens) - order + 1):
        window = range(start, start + order)
        if all((mask[p] if mask is not None else tokens[p] != 0) for p in window):
          counts[tuple(int(tokens[p]) for p in window)] += 1
    return counts

  query_counts = [grams(q, None if query_mask is None else query_mask[i])
                  for i, q in enumerate(queries)]
  candidate_counts = [grams(c, None if candidate_mask is None else candidate_mask[i])
                      for i, c in enumerate(candidates)]
  n = len(candidates)
  df = collections.Counter()
  for counts in candidate_counts:
    for gram in counts:
      df[gram] += 1
  idf = {g: math.log((1 + n) / (1 + d)) + 1 for g, d in df.items()}

  def vector(counts):
    tf = {g: (1 + math.log(c) if sublinear_tf else c) for g, c in counts.items()}
    v = {g: t * idf[g] for g, t in tf.items() if g in idf}
    norm = math.sqrt(sum(x * x for x in v.values()))
    return {g: x / norm for g, x in v.items()} if norm > 0 else {}

  qv = [vector(c) for c in query_counts]
  cv = [vector(c) for c in candidate_counts]
  return np.array([[sum(x * c.get(g, 0.0) for g, x in q.items()) for c in cv]
                   for q in qv])


def _random_tokens(key, shape, low, high):
  return np.array(jax.random.randint(jax.random.key(key), shape, low, high))


class TfidfReferenceTest(absltest.TestCase):

  def test_unigrams_and_bigrams_match_loop_reference(self):
    queries = _random_tokens(0, (3, 7), 0, 6)
    candidates = _random_tokens(1, (5, 9), 0, 6)
    for ngram in (1, 2):
      for sublinear in (False, True):
        got = influence.tfidf_similarity(queries, candidates, ngram=ngram,
                                         sublinear_tf=sublinear)
        expected = _reference(queries, candidates, ngram, sublinear_tf=sublinear)
        np.testing.assert_allclose(got, expected, atol=1e-5)

  def test_masks_and_padding_ignored(self):
    queries = _random_tokens(2, (2, 6), 1, 7)
    candidates = _random_tokens(3, (4, 6), 1, 7)
    query_mask = np.ones_like(queries, bool)
    query_mask[0, 3:] = False
    candidate_mask = np.ones_like(candidates, bool)
    candidate_mask[1, :2] = False
    candidate_mask[2, 4] = False  # A hole inside: bigrams across it do not count.
    got = influence.tfidf_similarity(queries, candidates, ngram=2,
                                     query_mask=query_mask,
                                     candidate_mask=candidate_mask)
    np.testing.assert_allclose(
        got, _reference(queries, candidates, 2, query_mask, candidate_mask),
        atol=1e-5)
    # Whatever sits under the mask does not matter, nor does 0-padding without one.
    scrambled = np.where(candidate_mask, candidates, 5)
    np.testing.assert_allclose(
        influence.tfidf_similarity(queries, scrambled, ngram=2,
                                   query_mask=query_mask,
                                   candidate_mask=candidate_mask), got, atol=1e-6)
    padded = np.concatenate([candidates, np.zeros((4, 3), candidates.dtype)], 1)
    np.testing.assert_allclose(
        influence.tfidf_similarity(queries, padded, ngram=2),
        influence.tfidf_similarity(queries, candidates, ngram=2), atol=1e-6)

  def test_matches_sklearn_when_available(self):
    try:
      from sklearn.feature_extraction import text  # pylint: disable=g-import-not-at-top
    except ImportError:
      self.skipTest("scikit-learn not installed")
    queries = _random_tokens(4, (3, 10), 1, 9)
    candidates = _random_tokens(5, (6, 12), 1, 9)
    vectorizer = text.TfidfVectorizer(analyzer=lambda row: [str(t) for t in row])
    c = vectorizer.fit_transform(list(candidates))
    q = vectorizer.transform(list(queries))
    np.testing.assert_allclose(influence.tfidf_similarity(queries, candidates),
                               (q @ c.T).toarray(), atol=1e-5)

  def test_hashed_ngrams_match_exact_and_jit(self):
    queries = _random_tokens(6, (2, 6), 1, 256)
    candidates = _random_tokens(7, (5, 6), 1, 256)
    queries[0, :3] = candidates[1, 2:5]  # A shared trigram.
    # 256² + 256³ n-gram ids do not fit in 2^18 buckets, so they are hashed; ~100
    # n-grams in 2^18 buckets are free of collisions with a good hash.
    jitted = jax.jit(influence.tfidf_similarity,
                     static_argnames=("ngram", "vocab_size", "num_buckets"))
    hashed = jitted(jnp.asarray(queries), jnp.asarray(candidates), ngram=3,
                    vocab_size=256, num_buckets=2 ** 18)
    np.testing.assert_allclose(hashed, _reference(queries, candidates, 3),
                               atol=1e-5)


class TfidfFilterTest(absltest.TestCase):

  def test_planted_candidates_kept_in_order(self):
    num_queries, num_candidates, length, top_k = 4, 60, 32, 3
    # Distractors: common byte ids only. Each query gets 8 rare ids (150 + 10 q + j)
    # planted in `top_k` candidates, more of them in earlier plants (8, 6, 4).
    candidates = _random_tokens(8, (num_candidates, length), 1, 100)
    queries = _random_tokens(9, (num_queries, length), 1, 100)
    rng = np.random.default_rng(0)
    planted = rng.permutation(num_candidates)[:num_queries * top_k].reshape(
        num_queries, top_k)
    for q in range(num_queries):
      rare = 150 + 10 * q + np.arange(8)
      queries[q, :8] = rare
      for rank, c in enumerate(planted[q]):
        candidates[c, :8 - 2 * rank] = rare[:8 - 2 * rank]
    indices = influence.tfidf_filter(queries, candidates, top_k)
    self.assertEqual(indices.shape, (num_queries, top_k))
    self.assertEqual(indices.dtype, jnp.int32)
    # The strongest plant leads; the others are kept, in similarity order (common
    # tokens shared by chance may swap the weaker plants).
    np.testing.assert_array_equal(indices[:, 0], planted[:, 0])
    np.testing.assert_array_equal(np.sort(indices, 1), np.sort(planted, 1))
    similarity = influence.tfidf_similarity(queries, candidates)
    np.testing.assert_array_equal(
        indices, np.argsort(-np.asarray(similarity), axis=1, kind="stable")[:, :top_k])

  def test_filter_batch_gathers_rows(self):
    batch = {"inputs": np.arange(12).reshape(6, 2), "mask": np.arange(6) * 1.0}
    indices = jnp.array([[5, 0], [2, 2]], jnp.int32)
    out = influence.filter_batch(batch, indices)
    np.testing.assert_array_equal(out["inputs"], batch["inputs"][np.asarray(indices)])
    np.testing.assert_array_equal(out["mask"], [[5.0, 0.0], [2.0, 2.0]])
    with self.assertRaisesRegex(ValueError, r"\[0, 6\)"):
      influence.filter_batch(batch, jnp.array([6]))

  def test_validation_names_the_argument(self):
    queries = _random_tokens(10, (2, 5), 1, 5)
    candidates = _random_tokens(11, (4, 5), 1, 5)
    for top_k in (0, -1, 5):
      with self.assertRaisesRegex(ValueError, "top_k"):
        influence.tfidf_filter(queries, candidates, top_k)
    with self.assertRaisesRegex(ValueError, "query_mask"):
      influence.tfidf_filter(queries, candidates, 2, query_mask=np.ones((2, 4)))
    with self.assertRaisesRegex(ValueError, "candidate_mask"):
      influence.tfidf_filter(queries, candidates, 2, candidate_mask=np.ones((3, 5)))
    with self.assertRaisesRegex(ValueError, "candidate_tokens"):
      influence.tfidf_filter(queries, candidates[0], 2)
    with self.assertRaisesRegex(ValueError, "query_tokens"):
      influence.tfidf_filter(queries * 1.0, candidates, 2)
    with self.assertRaisesRegex(ValueError, "vocab_size"):
      influence.tfidf_filter(queries, candidates, 2, vocab_size=3)
    with self.assertRaisesRegex(ValueError, "ngram"):
      influence.tfidf_filter(queries, candidates, 2, ngram=0)
    # NumPy integers are integers; a scalar leaf has no example axis.
    np.testing.assert_array_equal(
        influence.tfidf_similarity(queries, candidates, ngram=np.int64(2)),
        influence.tfidf_similarity(queries, candidates, ngram=2))
    with self.assertRaisesRegex(ValueError, "^filter_batch: every leaf needs a "
                                "leading example axis"):
      influence.filter_batch({"x": np.zeros((3, 2)), "n": np.float32(1)}, [0])
    # Padding the mask leaves out may hold any id (-1, or beyond int32): it is
    # not counted, so it changes nothing.
    mask = np.ones((2, 5))
    mask[:, -1] = 0
    expected = influence.tfidf_similarity(queries, candidates, query_mask=mask)
    for pad in (-1, 2**40):
      padded = queries.astype(np.int64)
      padded[:, -1] = pad
      np.testing.assert_array_equal(
          influence.tfidf_similarity(padded, candidates, query_mask=mask), expected)
    # 64-bit ids are range-checked before the int32 cast (2**32 + 1 wrapped to 1).
    wide = np.full((1, 2), 2**32 + 1, np.int64)
    for vocab_size in (None, 3):
      with self.assertRaisesRegex(ValueError, r"^query_tokens: token id 4294967297 "
                                  "is outside int32"):
        influence.tfidf_similarity(wide, candidates.astype(np.int64),
                                   vocab_size=vocab_size)


if __name__ == "__main__":
  absltest.main()
