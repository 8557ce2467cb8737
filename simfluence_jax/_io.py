"""Workdir files: atomic writes, pickle-free arrays, local disks and buckets alike.

Every path goes through `etils.epath` (the abstraction orbax and TFDS use), so a
workdir can be a local directory or a bucket (`gs://...`). For gs://, epath uses
TensorFlow's gfile where TensorFlow is installed, else fsspec's gcsfs (`pip install
'simfluence_jax[gcs]'`, which also brings the GCS client orbax asks on gs://).

* Locally, a file or directory is written into a temporary sibling and renamed into
  place, so a reader never sees a half-written one: after a crash it finds the old
  version or none. Temporary files get the permissions of an ordinary file (0666 and
  0777 less the umask), so a team can read a shared workdir.
* On an object store, writers still write into a local temporary directory; the
  finished file (or directory) is then uploaded. A single object upload is atomic;
  a directory upload is not, so a bucket workdir follows the single-writer rule of
  `pipeline.workdir_lock` (one job per workdir, kept by a lease file; a killed job's
  partial uploads are recomputed because its stage record says "running").
* Nothing here needs POSIX semantics of a bucket: no file locks, no appends, no
  renames (a bucket "directory" is only a prefix of object names).
* A bucket workdir must be gs:// (`check_workdir`): the orbax checkpoints in it
  (base model, training state, TracIn checkpoints) are written by TensorStore,
  which writes to gs:// and to local files only. The plain files here (a trace, a
  curriculum, JSON) work on any bucket epath reaches.
"""

import contextlib
import io
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Iterator, Optional, Union

from etils import epath
import numpy as np

PathLike = Union[str, os.PathLike]
_REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def as_path(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path` (local paths made absolute)."""
  text = os.fspath(path)
  if not is_remote(text):
    text = os.path.abspath(text)
  return epath.Path(text)


def is_remote(path: PathLike) -> bool:
  """Whether `path` is on an object store rather than a POSIX filesystem."""
  return os.fspath(path).startswith(_REMOTE_SCHEMES)


def check_workdir(path: PathLike) -> None:
  """Raises ValueError if `path` is a bucket that cannot hold a workdir.

  A workdir holds orbax checkpoints, whose arrays TensorStore writes to gs:// and
  local paths only (s3://, az://, hf:// fail inside orbax, after minutes of work).
  """
  text = os.fspath(path)
  if is_remote(text) and not text.startswith("gs://"):
    raise ValueError(f"--workdir={text!r}: a workdir is a local directory or a gs:// "
                     "bucket (its orbax checkpoints are written by TensorStore, which "
                     "writes to gs:// and local files only).")


def _read_umask() -> Optional[int]:
  """The process umask from /proc (Linux), without changing it; None elsewhere."""
  try:
    with open("/proc/self/status", encoding="ascii") as status:
      for line in status:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  return None


def _umask_by_setting() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


# Where /proc cannot tell, the umask is read once, at import: setting it to read it
# later would, for an instant, make files other threads (orbax's writers) create
# world-writable.
_IMPORT_UMASK = _read_umask()
if _IMPORT_UMASK is None:
  _IMPORT_UMASK = _umask_by_setting()


def _umask() -> int:
  mask = _read_umask()
  return _IMPORT_UMASK if mask is None else mask


def _publish_permissions(path: str) -> None:
  """Gives a temporary file or tree the permissions of ordinary new files."""
  mask = _umask()
  if os.path.isdir(path):
    for root, _, files in os.walk(path):
      os.chmod(root, 0o777 & ~mask)
      for name in files:
        os.chmod(os.path.join(root, name), 0o666 & ~mask)
  else:
    os.chmod(path, 0o666 & ~mask)


def makedirs(path: PathLike) -> epath.Path:
  path = as_path(path)
  path.mkdir(parents=True, exist_ok=True)
  return path


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def remove_tree(path: PathLike) -> None:
  """Deletes a file or directory if it exists."""
  path = as_path(path)
  if path.is_dir():
    path.rmtree()
  elif path.exists():
    path.unlink()


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
  """Calls `write(tmp)` on a local temporary file, then moves it to `path`.

  The temporary file keeps `path`'s extension (np.save, savefig read it).
  """
  target = as_path(path)
  suffix = target.suffix
  if is_remote(target):
    with tempfile.TemporaryDirectory() as tmp_dir:
      tmp = os.path.join(tmp_dir, "file" + suffix)
      write(tmp)
      target.parent.mkdir(parents=True, exist_ok=True)
      epath.Path(tmp).copy(target, overwrite=True)
    return
  directory = os.fspath(target.parent)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
  os.close(fd)
  try:
    write(tmp)
    _publish_permissions(tmp)
    os.replace(tmp, os.fspath(target))
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: PathLike, text: str) -> None:
  """Writes `text` to `path` atomically (creating the parent directory)."""
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  atomic_write(path, write)


def write_json(path: PathLike, value: Any) -> None:
  write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_text(path: PathLike) -> str:
  return as_path(path).read_text()


def read_json(path: PathLike, who: str) -> Any:
  """Parsed JSON of `path`; ValueError naming `who` and the file if it is corrupt."""
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{who}: {os.fspath(path)!r} is corrupt ({e}).") from e


def save_npy(path: PathLike, array: Any) -> None:
  """np.save without pickle, atomically."""
  array = np.asarray(array)

  def write(tmp):
    # Through an open file: np.save given a name not ending in ".npy" appends
    # ".npy" to it, and the (empty) temporary file would be published.
    with open(tmp, "wb") as f:
      np.save(f, array, allow_pickle=False)
  atomic_write(path, write)


def save_figure(fig, path: PathLike) -> None:
  """Saves a matplotlib figure as PNG atomically and closes it.

  The figure is drawn once, at its own size: `bbox_inches="tight"` would draw it a
  second time to measure it (2.8 of the 4.8 s the tiny job spent saving its 13
  figures, under cProfile). Figures lay themselves out (`tight_layout`, or fixed
  margins: `evaluation._report._set_margins`).
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
  plt.close(fig)


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[str]:
  """Yields a local temporary directory that replaces `path` when the block succeeds."""
  target = as_path(path)
  if is_remote(target):
    with tempfile.TemporaryDirectory() as tmp:
      yield tmp
      remove_tree(target)
      _upload_tree(tmp, target)
    return
  path = os.fspath(target)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + "-tmp-", dir=parent)
  try:
    yield tmp
    _publish_permissions(tmp)
    if os.path.exists(path):
      # A fresh name: never a user's own "<path>.old", which would be deleted, or
      # a file there, which os.replace could not move a directory onto.
      old = os.path.join(parent, f".{os.path.basename(path)}-old-{uuid.uuid4().hex}")
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _upload_tree(local: str, target: epath.Path) -> None:
  """Copies every file under the local directory `local` to the same place under
  `target` (over same-named files; others are kept)."""
  for root, _, files in os.walk(local):
    relative = os.path.relpath(root, local)
    destination = target if relative == "." else target / relative
    destination.mkdir(parents=True, exist_ok=True)
    for name in files:
      epath.Path(os.path.join(root, name)).copy(destination / name, overwrite=True)


@contextlib.contextmanager
def local_directory(path: PathLike) -> Iterator[str]:
  """A local directory for writers that only write local files (TensorBoard's).

  A local `path` is yielded as it is (the writer writes in place); for a bucket
  path, a local temporary directory whose files are uploaded into `path` when the
  block ends, over same-named files, leaving the others (it adds files, where
  `atomic_directory` replaces the directory).
  """
  if not is_remote(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory() as tmp:
    yield tmp
    _upload_tree(tmp, as_path(path))


def load_npy(file: PathLike, who: str, mmap: bool = False) -> np.ndarray:
  """np.load without pickle; errors name `who` (the caller) and the file.

  `mmap` applies to local files (a bucket file is read whole).

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: the file is corrupt, truncated or pickled.
  """
  path = as_path(file)
  if not path.exists():
    raise FileNotFoundError(f"{who}: {os.fspath(file)!r} is missing.")
  try:
    if is_remote(path):
      array = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    else:
      array = np.load(os.fspath(path), mmap_mode="r" if mmap else None,
                      allow_pickle=False)
  except (ValueError, EOFError) as e:  # pickled arrays, empty or truncated files
    raise ValueError(f"{who}: {os.fspath(file)!r} is corrupt or not a plain array "
                     f"({e}).") from e
  except OSError as e:
    raise ValueError(f"{who}: {os.fspath(file)!r} is corrupt ({e}).") from e
  if not isinstance(array, np.ndarray):  # an .npz archive under an .npy name
    array.close()
    raise ValueError(f"{who}: {os.fspath(file)!r} is an .npz archive, not a plain "
                     "array.")
  return array
