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
