"""Crash-safe files: files and directories written atomically, arrays read without pickle.

A file or directory is written into a temporary sibling and renamed into place, so a
reader never sees a half-written one: after a crash it finds the old version or none.
"""

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator

import numpy as np


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Calls `write(tmp)` on a temporary file beside `path`, then renames it to `path`.

  The temporary file keeps `path`'s extension (np.save, savefig read it).
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1],
                             dir=directory)
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (creating the parent directory)."""
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  atomic_write(path, write)


def save_figure(fig, path: str) -> None:
  """Saves a matplotlib figure as PNG atomically and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png",
                                             bbox_inches="tight"))
  plt.close(fig)


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
