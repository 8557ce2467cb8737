"""What the PyTorch peers of the benchmarks share; imports only torch and the peers.

(`_common.py` imports flax and jax: a peer's whole-process timing must not pay for
them.)
"""


def kronfluence_classification_task():
  """A `kronfluence.Task`: summed cross-entropy, the true Fisher's sampled labels."""
  import torch  # pylint: disable=g-import-not-at-top
  import kronfluence  # pylint: disable=g-import-not-at-top

  class Task(kronfluence.Task):

    def compute_train_loss(self, batch, model, sample=False):
      x, y = batch
      logits = model(x)
      if sample:
        with torch.no_grad():
          y = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
      return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
      return self.compute_train_loss(batch, model)

  return Task()


class KronfluenceEKFAC:
  """Kronfluence's EK-FAC on one model: `fit(train_set)`, then `pairwise(...)` and
  `self_scores(...)` from the fitted factors (empirical Fisher, absolute damping)."""

  def __init__(self, net, damping, batch_size, output_dir):
    import kronfluence  # pylint: disable=g-import-not-at-top
    from kronfluence import arguments  # pylint: disable=g-import-not-at-top
    task = kronfluence_classification_task()
    self.analyzer = kronfluence.Analyzer(
        "bench", kronfluence.prepare_model(net, task), task, cpu=True,
        disable_tqdm=True, output_dir=output_dir)
    self.factor_args = arguments.FactorArguments(strategy="ekfac",
                                                 use_empirical_fisher=True)
    self.score_args = arguments.ScoreArguments(damping_factor=damping)
    self.batch_size = batch_size

  def fit(self, train_set):
    self.analyzer.fit_all_factors("factors", train_set,
                                  per_device_batch_size=self.batch_size,
                                  factor_args=self.factor_args,
                                  overwrite_output_dir=True)

  def pairwise(self, query_set, train_set):
    """float[Q, N] from the fitted factors."""
    self.analyzer.compute_pairwise_scores(
        "scores", "factors", query_set, train_set,
        per_device_query_batch_size=len(query_set),
        per_device_train_batch_size=self.batch_size, score_args=self.score_args,
        overwrite_output_dir=True)
    return self.analyzer.load_pairwise_scores("scores")["all_modules"].numpy()

  def self_scores(self, train_set):
    """float[N] self-influence from the fitted factors."""
    self.analyzer.compute_self_scores(
        "self", "factors", train_set, per_device_train_batch_size=self.batch_size,
        score_args=self.score_args, overwrite_output_dir=True)
    return self.analyzer.load_self_scores("self")["all_modules"].numpy()


def kronfluence_pairwise(net, train_set, query_set, damping, batch_size, output_dir):
  """`() -> float[Q, N]`: Kronfluence's EK-FAC factors on `train_set`, then pairwise
  scores of `query_set` (every call refits, like one whole attribution)."""
  peer = KronfluenceEKFAC(net, damping, batch_size, output_dir)

  def run():
    peer.fit(train_set)
    return peer.pairwise(query_set, train_set)
  return run
