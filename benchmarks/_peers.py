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


def kronfluence_pairwise(net, train_set, query_set, damping, batch_size, output_dir):
  """`() -> float[Q, N]`: Kronfluence's EK-FAC factors on `train_set`, then pairwise
  scores of `query_set` (every call refits, like one whole attribution)."""
  import kronfluence  # pylint: disable=g-import-not-at-top
  from kronfluence import arguments  # pylint: disable=g-import-not-at-top
  task = kronfluence_classification_task()
  net = kronfluence.prepare_model(net, task)
  analyzer = kronfluence.Analyzer("bench", net, task, cpu=True, disable_tqdm=True,
                                  output_dir=output_dir)
  factor_args = arguments.FactorArguments(strategy="ekfac", use_empirical_fisher=True)
  score_args = arguments.ScoreArguments(damping_factor=damping)

  def run():
    analyzer.fit_all_factors("factors", train_set, per_device_batch_size=batch_size,
                             factor_args=factor_args, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(
        "scores", "factors", query_set, train_set,
        per_device_query_batch_size=len(query_set),
        per_device_train_batch_size=batch_size, score_args=score_args,
        overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("scores")["all_modules"].numpy()
  return run


def kronfluence_self(net, train_set, damping, batch_size, output_dir):
  """`() -> float[N]`: Kronfluence's EK-FAC self-influence of `train_set`; the
  factors are fitted once, here, and every call computes the scores only."""
  import kronfluence  # pylint: disable=g-import-not-at-top
  from kronfluence import arguments  # pylint: disable=g-import-not-at-top
  task = kronfluence_classification_task()
  net = kronfluence.prepare_model(net, task)
  analyzer = kronfluence.Analyzer("bench_self", net, task, cpu=True, disable_tqdm=True,
                                  output_dir=output_dir)
  analyzer.fit_all_factors(
      "factors", train_set, per_device_batch_size=batch_size,
      factor_args=arguments.FactorArguments(strategy="ekfac",
                                            use_empirical_fisher=True),
      overwrite_output_dir=True)

  def run():
    analyzer.compute_self_scores(
        "self", "factors", train_set, per_device_train_batch_size=batch_size,
        score_args=arguments.ScoreArguments(damping_factor=damping),
        overwrite_output_dir=True)
    return analyzer.load_self_scores("self")["all_modules"].numpy()
  return run
