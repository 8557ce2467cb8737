"""One `error:` line for a bad command line, shared by every CLI's flag parser.

absl prints a bad flag as a "FATAL Flags parsing error" block, and ml_collections'
config flags raise errors whose text is a repr (`'num_run'\\nDid you mean ...`) or
holds a whole traceback (a config file whose `get_config` raised). Each becomes one
line naming the flag.
"""

import gc
import sys
from typing import Sequence

from absl import flags

# What absl, ml_collections' config flags and a config file's get_config raise.
FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError,
               FileNotFoundError)


# What a CLI's run prints as one `error:` line (exit 1): bad input, a stale
# workdir, and a path that is a file where a folder must be, or the reverse
# (review h28: tracebacks of FileExistsError and IsADirectoryError).
RUN_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError,
              NotADirectoryError, PermissionError)


# Collect the youngest generation every GC_THRESHOLD0 container allocations (Python's
# default is 700), for the CLIs' processes only (`freeze_import_heap`).
GC_THRESHOLD0 = 10_000


def freeze_import_heap() -> None:
  """Takes what the imports built out of the cyclic GC's reach; a rarer young GC.

  For a CLI's process, after its imports: a library must not change its user's
  GC. The modules and the tables JAX, Flax and TensorFlow build at import live as
  long as the process, yet every full collection walked them again; and tracing
  and lowering allocate millions of short-lived containers, each 700 of which
  started a collection. Garbage is collected first, so none is frozen. The tiny job
  spent 2.0 of its 35 s in the GC, 1.6 s with the freeze alone, 0.55 s with both
  (docs/experiments.md, "Python's cyclic GC").
  """
  gc.collect()
  gc.freeze()
  gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])


def flag_error_line(error: BaseException, argv: Sequence[str]) -> str:
  """The message of a flag-parsing error, on one line, naming the flag."""
  cause = error  # ml_collections wraps a KeyError in an AttributeError
  while cause.args and isinstance(cause.args[0], BaseException):
    cause = cause.args[0]
  if isinstance(cause, KeyError) and cause.args:
    # An unknown config field: its str is a repr; the argument is the field's
    # name, then ml_collections' suggestion on the next lines.
    lines = [line.strip() for line in str(cause.args[0]).splitlines() if line.strip()]
    field = lines[0].strip("'\"") if lines else ""
    flag = next((arg.split("=", 1)[0] for arg in argv[1:]
                 if arg.startswith("--config.")
                 and field in arg.split("=", 1)[0].split(".")), "--config")
    return "; ".join([f"{flag}: the config has no field {field!r}"] + lines[1:])
  text = str(cause).strip()
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
    # A config file that raised: the first line names the flag, the last the error.
    return f"{lines[0].rstrip(':')}: {lines[-1]}"
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1]
  return " ".join(lines) if len(lines) > 1 else (text or type(error).__name__)


def parse_flags(argv: Sequence[str]):
  """absl's parsing of `argv`; a bad flag prints one `error:` line and exits 2."""
  try:
    return flags.FLAGS(argv)
  except FLAG_ERRORS as e:
    print(f"error: {flag_error_line(e, argv)}", file=sys.stderr)
    sys.exit(2)
