"""Crash-safe files: directories written atomically, arrays read without pickle.

A directory is written into a temporary sibling and renamed into place, so a reader
never sees a half-written one: after a crash it finds the old version or none.
"""

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
  """Yields a temporary directory that replaces `path` when the block succeeds."""
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + "-tmp-", dir=parent)
  try:
    yield tmp
    if os.path.exists(path):
      old = path + ".old"
      shutil.rmtree(old, ignore_errors=True)
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_npy(file: str, who: str, mmap: bool = False) -> np.ndarray:
  """np.load without pickle; errors name `who` (the caller) and the file.

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: the file is corrupt, truncated or pickled.
  """
  if not os.path.exists(file):
    raise FileNotFoundError(f"{who}: {file!r} is missing.")
  try:
    return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
  except ValueError as e:  # pickled object arrays, truncated headers or data
    raise ValueError(f"{who}: {file!r} is corrupt or not a plain array ({e}).") from e
  except OSError as e:
    raise ValueError(f"{who}: {file!r} is corrupt ({e}).") from e
