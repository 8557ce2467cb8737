"""EK-FAC factors + pairwise scores: ours against Kronfluence, same models and data.

Budget (benchmarks/run.py): ≥ 2× faster warm, same scores (docs/design.md §7 judges
EK-FAC as whole processes, `end_to_end_bench.py`). Conventions matched: empirical
Fisher (`use_empirical_fisher=True`), summed per-example CE losses, loss as the
measurement, all float32, and one explicit absolute damping λ = `DAMPING` on both
sides (ours: `damping=DAMPING`; Kronfluence: `ScoreArguments(damping_factor=
DAMPING)`). The two libraries do not share a default: ours is 0.1 × mean(Λ) per
layer, Kronfluence's `damping_factor` defaults to 1e-8 (its 0.1 × mean(Λ) heuristic
is `damping_factor=None`), so comparing defaults would compare different dampings.

Two models: the MLP 64-128-10 (timed) and, for agreement only, the CNN of
`_common.CNN` (Conv-Conv-Dense-Dense on 8x8 inputs) with Kronfluence tracking
every `Conv2d` and `Linear` (its unfold patches are ours: channels major, then the
kernel's offsets, a ones column for the bias). Then self-influence
`⟨∇ℓ_i, (G+λI)^{-1} ∇ℓ_i⟩` of every train example on the MLP against Kronfluence's
`compute_self_scores` (factors fitted once on each side, untimed). Timings on the
shared 2-core CPU are noisy.

  python benchmarks/ekfac_bench.py [--quick]
"""

import argparse
import contextlib
import logging
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import influence

import _common  # benchmarks/ is on sys.path when a script there runs
import _peers

SIZES = {"full": (2048, 64), "quick": (512, 16), "smoke": (256, 4)}  # N, Q
CNN_SIZES = {"full": (512, 16), "quick": (128, 8), "smoke": (64, 4)}  # N, Q
DAMPING = 1e-3  # absolute λ, the same on both sides


def _torch_sets(inputs, labels, num_query):
  """(train set, query set of the first `num_query`) as torch datasets."""
  import torch  # pylint: disable=g-import-not-at-top
  train_set = torch.utils.data.TensorDataset(torch.tensor(inputs),
                                             torch.tensor(labels, dtype=torch.long))
  query_set = torch.utils.data.TensorDataset(
      torch.tensor(inputs[:num_query]), torch.tensor(labels[:num_query],
                                                     dtype=torch.long))
  return train_set, query_set


@contextlib.contextmanager
def _fitted_kronfluence(net, train_set, damping):
  """Kronfluence's EK-FAC on `net` with factors fitted on `train_set` (in a
  temporary output directory, its warnings muted)."""
  logging.disable(logging.WARNING)
  try:
    with tempfile.TemporaryDirectory() as directory:
      peer = _peers.KronfluenceEKFAC(net, damping, 256, directory)
      peer.fit(train_set)
      yield peer
  finally:
    logging.disable(logging.NOTSET)


def _ours(model, inputs, labels, num_query, damping, batch_size=256):
  """Our side: `.params`, `.task`, `.batches`, `.fit()`, `.scores(factors)` and
  `.run()` (factors + pairwise scores)."""
  params = jax.jit(model.init)(jax.random.key(2), inputs[:1])  # one program
  task = influence.ClassificationTask(model.apply)
  batches = [{"inputs": jnp.asarray(inputs[i:i + batch_size]),
              "labels": jnp.asarray(labels[i:i + batch_size])}
             for i in range(0, len(inputs), batch_size)]
  query = {"inputs": jnp.asarray(inputs[:num_query]),
           "labels": jnp.asarray(labels[:num_query])}
  fit = lambda: influence.fit_ekfac(task, params, batches)
  scores = lambda factors: jax.block_until_ready(influence.ekfac_scores(
      task, params, factors, query, batches, damping=damping))
  return types.SimpleNamespace(params=params, task=task, batches=batches, fit=fit,
                               scores=scores, run=lambda: scores(fit()))


def _state_arrays(params):
  """`_common.torch_state` as numpy arrays (for `_peers.time_in_child`)."""
  return {k: v.numpy() for k, v in _common.torch_state(params).items()}


def _self_influence(ours, factors, damping):
  return jax.block_until_ready(influence.ekfac_self_influence(
      ours.task, ours.params, factors, ours.batches, damping=damping))


def cnn_agreement(num_train=128, num_query=8, damping=DAMPING):
  """Ours vs Kronfluence EK-FAC on `_common.CNN` (every Conv2d and Linear tracked):
  pairwise scores and self-influence, from one fit of the factors on each side.

  Returns:
    dict of `_common.agreement` (pearson, max_rel_err, norm_ratio) of the pairwise
    scores, the same with a `self_` prefix for self-influence, and the sizes;
    raises ImportError without torch / kronfluence.
  """
  inputs, labels = _common.cnn_data(num_train)
  ours = _ours(_common.CNN(), inputs, labels, num_query, damping)
  factors = ours.fit()
  pairwise, own = np.asarray(ours.scores(factors)), _self_influence(ours, factors,
                                                                     damping)
  train_set, query_set = _torch_sets(np.transpose(inputs, (0, 3, 1, 2)), labels,
                                     num_query)
  with _fitted_kronfluence(_common.torch_cnn(ours.params), train_set, damping) as peer:
    theirs, their_own = peer.pairwise(query_set, train_set), peer.self_scores(train_set)
  return dict(_common.agreement(pairwise, theirs),
              **{f"self_{k}": v for k, v in _common.agreement(own, their_own).items()},
              num_train=num_train, num_query=num_query, damping=damping)


def measure(size="full", peer=True, repeats=2):
  """Times our EK-FAC factors + pairwise scores, and Kronfluence's if `peer`.

  Returns:
    dict: `ours_s` (best warm call), `damping`; with the peer installed and `peer`,
    `peer_s` (best warm call), `peer_first_call_s`, `speedup`, `pearson`,
    `max_rel_err` and `norm_ratio` (ours / theirs) on the MLP, and `cnn_pearson`,
    `cnn_max_rel_err`, `cnn_norm_ratio` on the CNN; without it, `peer_missing`.
  """
  num_train, num_query = SIZES[size]
  inputs = np.asarray(jax.random.normal(jax.random.key(0), (num_train, 64)))
  labels = np.asarray(jax.random.randint(jax.random.key(1), (num_train,), 0, 10))
  side = _ours(_common.MLP(), inputs, labels, num_query, DAMPING)
  ours_time, _, ours = _common.best_of(side.run, repeats)  # as many as the peer's
  result = {"num_train": num_train, "num_query": num_query, "ours_s": ours_time,
            "damping": DAMPING}
  if not peer:
    return result
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
    import kronfluence  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError as e:
    return dict(result, peer_missing=str(e))
  # Both sides timed warm (best of `repeats` after a first call: our compile,
  # torch's one-time set-up); the first call is kept as peer_first_call_s. The
  # peer runs in a process of its own (`_peers.time_in_child`: in this one its
  # gc.collect() calls would also walk JAX's objects).
  kron_time, first, theirs = _peers.time_in_child(
      "pairwise", _state_arrays(side.params), inputs, labels, num_query, DAMPING,
      repeats)
  cnn = cnn_agreement(*CNN_SIZES[size])
  return dict(result, peer_s=kron_time, peer_first_call_s=first,
              speedup=kron_time / ours_time, **_common.agreement(ours, theirs),
              **{f"cnn_{k}": cnn[k] for k in ("pearson", "max_rel_err", "norm_ratio",
                                              "self_pearson", "self_max_rel_err")})


def measure_self(size="full", repeats=2):
  """Times EK-FAC self-influence `⟨∇ℓ_i, (G+λI)^{-1} ∇ℓ_i⟩` of every train example
  (factors fitted once, outside the timing), ours against Kronfluence's
  `compute_self_scores` on the same MLP, data and λ.

  Returns:
    dict: `ours_s`, `peer_s` (best warm calls), `speedup` and the agreement of the
    [N] scores; `peer_missing` without torch / kronfluence.
  """
  num_train, _ = SIZES[size]
  inputs = np.asarray(jax.random.normal(jax.random.key(0), (num_train, 64)))
  labels = np.asarray(jax.random.randint(jax.random.key(1), (num_train,), 0, 10))
  ours = _ours(_common.MLP(), inputs, labels, 1, DAMPING)
  factors = ours.fit()
  ours_time, _, own = _common.best_of(lambda: _self_influence(ours, factors, DAMPING),
                                      repeats)
  result = {"num_train": num_train, "ours_s": ours_time}
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
    import kronfluence  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError as e:
    return dict(result, peer_missing=str(e))
  peer_time, _, theirs = _peers.time_in_child(
      "self", _state_arrays(ours.params), inputs, labels, 1, DAMPING, repeats)
  return dict(result, peer_s=peer_time, speedup=peer_time / ours_time,
              **_common.agreement(own, theirs))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  r = measure("quick" if args.quick else "full")
  if "peer_missing" in r:
    raise SystemExit(f"kronfluence/torch missing ({r['peer_missing']}): "
                     "pip install -e .[bench]")
  num_train, num_query = r["num_train"], r["num_query"]
  ours_time, kron_time = r["ours_s"], r["peer_s"]
  print(f"EK-FAC factors + pairwise scores, MLP 64-128-10, N={num_train}, "
        f"Q={num_query}, damping λ={r['damping']} on both sides (noisy shared "
        f"2-core CPU)")
  print(f"{'':10s}{'ours':>10s}{'kronfluence':>13s}")
  print(f"{'time (s)':10s}{ours_time:10.3f}{kron_time:13.3f}")
  print(f"speed-up: {kron_time / ours_time:.1f}x (goal >= 2x)")
  print(f"MLP: Pearson {r['pearson']:.6f}, max |diff| / max |score| "
        f"{r['max_rel_err']:.2e}, ratio of norms {r['norm_ratio']:.4f}")
  print(f"CNN (Conv-Conv-Dense-Dense, every layer tracked): Pearson "
        f"{r['cnn_pearson']:.6f}, max |diff| / max |score| {r['cnn_max_rel_err']:.2e}, "
        f"ratio of norms {r['cnn_norm_ratio']:.4f}; self-influence Pearson "
        f"{r['cnn_self_pearson']:.6f}, max |diff| / max |score| "
        f"{r['cnn_self_max_rel_err']:.2e}")
  r = measure_self("quick" if args.quick else "full")
  print(f"EK-FAC self-influence of N={r['num_train']} (factors fitted once, untimed): "
        f"ours {r['ours_s']:.3f} s, kronfluence {r['peer_s']:.3f} s, speed-up "
        f"{r['speedup']:.1f}x; Pearson {r['pearson']:.6f}, max |diff| / max |score| "
        f"{r['max_rel_err']:.2e}")


if __name__ == "__main__":
  main()
