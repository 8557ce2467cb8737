"""Ours against the peers on the CNN of benchmarks/_common.py (skipped without them).

EK-FAC against Kronfluence tracking every Conv2d and Linear (empirical Fisher, the
same absolute damping on both sides; pairwise scores and self-influence) and TracIn-CP
against Captum's TracInCP, on the same weights: Pearson ≥ 0.999 and
max |ours − theirs| / max |theirs| ≤ 1e-2.
"""

import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")


@pytest.fixture(scope="module")
def benches():
  pytest.importorskip("torch")
  sys.path.insert(0, BENCHMARKS)
  try:
    import ekfac_bench  # pylint: disable=g-import-not-at-top
    import tracin_bench  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(BENCHMARKS)
  return ekfac_bench, tracin_bench


def test_ekfac_equals_kronfluence_on_cnn(benches):
  pytest.importorskip("kronfluence")
  r = benches[0].cnn_agreement(num_train=32, num_query=4)
  assert r["pearson"] >= 0.999, r
  assert r["max_rel_err"] <= 1e-2, r
  assert r["self_pearson"] >= 0.999, r
  assert r["self_max_rel_err"] <= 1e-2, r


def test_tracin_equals_captum_on_cnn(benches):
  pytest.importorskip("captum")
  r = benches[1].cnn_agreement(num_train=32, num_query=4, num_checkpoints=2)
  assert r["pearson"] >= 0.999, r
  assert r["max_rel_err"] <= 1e-2, r


def test_kronfluence_timed_in_its_own_process_scores_like_ours(benches):
  # The Kronfluence rows time the peer in a child process (`_peers.time_in_child`:
  # in ours its gc.collect() calls also walked JAX's objects, 1.3-1.6x its time);
  # the scores it sends back must be the same model's on the same data.
  pytest.importorskip("kronfluence")
  r = benches[0].measure_self("smoke", repeats=1)
  assert r["pearson"] >= 0.999, r
  assert r["max_rel_err"] <= 1e-2, r
  assert r["peer_s"] > 0, r
