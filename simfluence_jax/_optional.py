"""Optional dependencies: which extra brings what, and the one-line error without it.

`pip install simfluence_jax` is the core (jax, flax, optax, orbax-checkpoint,
ml-collections, numpy, etils, absl-py). A feature that needs more imports it through
`import_module(name, extra, feature)`, so that a missing package reads as one line
naming the extra to install, e.g.

  MissingExtraError: glue_rte data needs the 'seqio' extra (No module named
  'seqio'): pip install 'simfluence_jax[seqio]'

and a feature the job can do without (plots, TensorBoard) logs `skipped(...)`'s one
line once and carries on.
"""

import importlib
import logging
from types import ModuleType
from typing import Optional

_logger = logging.getLogger("simfluence_jax")

# extra -> the top-level modules it provides (setup.py's EXTRAS_REQUIRE).
EXTRAS = {
    "seqio": ("seqio", "tensorflow", "tensorflow_datasets"),
    "report": ("matplotlib", "clu", "tensorboard"),
    "digits": ("sklearn",),
    "grain": ("grain", "array_record"),
    "tpu": ("libtpu",),
    "bench": ("torch", "kronfluence", "captum"),
}

_skipped = set()


class MissingExtraError(ImportError):
  """An optional package is not installed; the message names the extra to install."""


def install_hint(extra: str) -> str:
  """`pip install 'simfluence_jax[extra]'`, the fix every message ends with."""
  if extra not in EXTRAS:
    raise ValueError(f"extra={extra!r}: unknown, expected one of {sorted(EXTRAS)}.")
  return f"pip install 'simfluence_jax[{extra}]'"


def import_module(name: str, extra: str, feature: Optional[str] = None) -> ModuleType:
  """Imports `name`, or raises one line naming the extra that provides it.

  Args:
    name: the module to import (`"clu.metric_writers"`, or a module of this package
      that imports optional packages at its top, e.g. `"simfluence_jax.data.tasks"`).
    extra: the setup.py extra that installs what `name` needs (a key of EXTRAS).
    feature: what the user asked for, for the message (default: `name`).

  Returns:
    The imported module.

  Raises:
    MissingExtraError: (an ImportError) `name` or a module it imports is missing;
      the message says which and how to install it.
  """
  hint = install_hint(extra)
  try:
    return importlib.import_module(name)
  except ImportError as error:
    # The message carries the original error, so a partly broken install (a package
    # present but one of its own dependencies missing) is still diagnosable.
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise MissingExtraError(
        f"{feature or name} needs the {extra!r} extra ({reason}): {hint}",
        name=getattr(error, "name", None)) from None


def available(name: str) -> bool:
  """Whether `import name` would succeed (a blocked `sys.modules[name] = None` too)."""
  try:
    importlib.import_module(name)
  except ImportError:
    return False
  return True


def skipped(what: str, extra: str) -> str:
  """Logs "`what` skipped: pip install ..." once per process; returns the line.

  For outputs the job can do without (plots, TensorBoard): the rest is written.
  """
  line = f"{what} skipped: {install_hint(extra)}"
  if line not in _skipped:
    _skipped.add(line)
    _logger.warning(line)
  return line


def lazy_exports(namespace: dict, exports: dict, submodules: tuple = ()):
  """Module-level `__getattr__` and `__dir__` (PEP 562) of a package with lazy names.

  Nothing is imported until an attribute is first read, so importing the package
  costs nothing and a feature's dependencies load when the feature is used.

  Args:
    namespace: the package's `globals()`.
    exports: public name -> the submodule (relative, e.g. "_ekfac") defining it.
    submodules: further submodules reachable as attributes (`pkg._ekfac`), as they
      would be after an eager import.

  Returns:
    (`__getattr__`, `__dir__`) to assign in the package's `__init__`.
  """
  package = namespace["__name__"]
  modules = set(submodules) | set(exports.values())

  def __getattr__(name: str):  # pylint: disable=invalid-name
    if name in exports:
      value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
    elif name in modules:
      value = importlib.import_module(f"{package}.{name}")
    else:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    namespace[name] = value  # later reads skip __getattr__
    return value

  def __dir__():  # pylint: disable=invalid-name
    return sorted(set(namespace) | set(exports) | modules)

  return __getattr__, __dir__
