"""Small NNX models shared by test modules (imported as `import nnx_models`)."""

from flax import nnx


class BatchNormNet(nnx.Module):
  """Linear(3, 4) -> BatchNorm -> tanh -> Linear(4, 2): non-parameter state
  (batch statistics) that eval mode reads and train mode updates."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(3, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.0, rngs=rngs)
    self.l2 = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.tanh(self.bn(self.l1(x))))


class DropoutNet(nnx.Module):
  """Linear(3, 4) -> tanh -> Dropout -> Linear(4, 2): RNG state (keys and counts)
  that train mode advances and eval mode leaves alone."""

  def __init__(self, rngs, rate=0.5):
    self.l1 = nnx.Linear(3, 4, rngs=rngs)
    self.drop = nnx.Dropout(rate, rngs=rngs)
    self.l2 = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(nnx.tanh(self.l1(x))))
