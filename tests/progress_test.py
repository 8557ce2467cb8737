"""Progress lines (chunk i/n, elapsed, ETA) of the EK-FAC and TracIn loops."""

import logging
import re

import flax.linen as nn
import jax
import numpy as np

import simfluence_jax as sj
from simfluence_jax.influence import _common

LINE = re.compile(r"^(.+): chunk (\d+)/(\d+)  elapsed \d+\.\ds  ETA \d+\.\ds$")


def _progress(caplog):
  """{label: [(done, total), ...]} of the progress lines logged."""
  out = {}
  for record in caplog.records:
    match = LINE.match(record.getMessage())
    if match:
      out.setdefault(match[1], []).append((int(match[2]), int(match[3])))
  return out


def test_influence_loops_log_progress(caplog):
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
  batch = {"inputs": x, "labels": (x[:, 0] > 0).astype(np.int32)}
  params = model.init(jax.random.PRNGKey(0), x[:1])
  task = sj.influence.ClassificationTask(model.apply)
  batches = [jax.tree_util.tree_map(lambda a, i=i: a[i:i + 8], batch)
             for i in range(0, 20, 8)]  # 8, 8, 4 examples
  query = jax.tree_util.tree_map(lambda a: a[:2], batch)
  with caplog.at_level(logging.INFO, logger="simfluence_jax"):
    factors = sj.influence.fit_ekfac(task, params, batches)
    sj.influence.ekfac_scores(task, params, factors, query, batches, chunk_size=4)
    sj.influence.tracin_scores(task, [params], [0.1], query, batches, chunk_size=8)
  lines = _progress(caplog)
  # First and last item always; the 10 s interval suppresses the ones in between.
  assert lines["fit_ekfac: covariances"] == [(1, 3), (3, 3)]
  assert lines["fit_ekfac: eigenvalues"] == [(1, 3), (3, 3)]
  assert lines["ekfac_scores (total)"] == [(1, 5), (5, 5)]  # chunks of 4: 2 + 2 + 1
  assert lines["tracin_scores"] == [(1, 3), (3, 3)]


def test_progress_is_silent_without_info(caplog):
  with caplog.at_level(logging.WARNING, logger="simfluence_jax"):
    progress = _common.Progress("quiet", 2, interval=0.0)
    progress.update(1)
    progress.update(2)
  assert not _progress(caplog)


def test_progress_interval(caplog):
  with caplog.at_level(logging.INFO, logger="simfluence_jax"):
    progress = _common.Progress("every", 4, interval=0.0)
    for done in range(1, 5):
      progress.update(done)
  assert _progress(caplog)["every"] == [(1, 4), (2, 4), (3, 4), (4, 4)]
  assert _common.num_chunks([{"x": np.zeros(8)}, {"x": np.zeros(4)}], 3) == 3 + 2
