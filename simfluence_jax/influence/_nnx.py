"""`flax.nnx` for the kernels, without importing it until the user has.

`import flax.nnx` costs 0.5-0.9 s of a process's start-up on 2 CPU cores (it imports
IPython), and a user of linen models never needs it. No object can be an NNX module,
variable or state before `flax.nnx` is imported, so the kernels read it from
`sys.modules`: until the user imports it, every attribute of `nnx` here is a class
that nothing is an instance or a subclass of, and `isinstance(x, nnx.Module)` is
simply False. The NNX functions (`nnx.split`, `nnx.state`, ...) are only called on NNX
objects, so never before then.
"""

import sys


class _NotImported:
  """Stands for every `flax.nnx` attribute while flax.nnx is not imported."""


class _LazyNNX:

  def __getattr__(self, name):
    module = sys.modules.get("flax.nnx")
    return _NotImported if module is None else getattr(module, name)


nnx = _LazyNNX()


def imported() -> bool:
  return "flax.nnx" in sys.modules
