"""A gs:// bucket with object-store semantics and no network, for tests.

`FakeBucket` is an fsspec filesystem for the `gs`/`gcs` protocols, so every
`etils.epath` access to a gs:// path (ours and orbax's) goes through it. It keeps
each object as a file under a local root (`<root>/<bucket>/<object name>`), so
that TensorStore, which writes orbax's arrays with its own C++ GCS driver and not
through Python, can be pointed at the same objects (`install`). Through fsspec it
behaves like a bucket, not like a POSIX directory:

* a "directory" is only a prefix of object names: `mkdir` does nothing, a prefix
  exists (and lists) only while an object is under it, and deleting its last
  object makes it vanish;
* an object is written whole, when its file is closed; there is no append;
* a rename is a copy of every object and then a delete (fsspec's `mv`): nothing
  is renamed atomically;
* gs:// paths are no local paths, so `fcntl`, `os.path` or `open` on them touch
  nothing in the bucket (a stray `os.makedirs("gs://...")` makes a local `gs:`
  directory in the working directory instead, which tests can look for).

`python tests/fake_bucket.py ROOT FLAGS...` runs the main job
(`python -m simfluence_jax.main FLAGS...`) with gs:// served from ROOT.
"""

import importlib
import io
import os
import sys
import tempfile

from fsspec.spec import AbstractFileSystem

PROTOCOLS = ("gs", "gcs")


class FakeBucket(AbstractFileSystem):
  """gs://<bucket>/<name> objects kept as files `root/<bucket>/<name>`."""

  protocol = PROTOCOLS
  root_marker = ""
  root: str = ""  # set by `bucket_class`

  def __init__(self, *args, **storage_options):
    storage_options.pop("finalize_on_close", None)  # epath passes it for gcsfs
    super().__init__(*args, **storage_options)

  @classmethod
  def _strip_protocol(cls, path):
    if isinstance(path, list):
      return [cls._strip_protocol(p) for p in path]
    path = os.fspath(path)
    for protocol in PROTOCOLS:
      if path.startswith(protocol + "://"):
        path = path[len(protocol) + 3:]
    return path.rstrip("/")

  def _local(self, path) -> str:
    return os.path.join(self.root, self._strip_protocol(path))

  @staticmethod
  def _holds_objects(local: str) -> bool:
    return any(files for _, _, files in os.walk(local))

  def info(self, path, **kwargs):
    name = self._strip_protocol(path)
    local = self._local(path)
    if os.path.isfile(local):
      stat = os.stat(local)
      return {"name": name, "size": stat.st_size, "type": "file",
              "mtime": stat.st_mtime}
    is_bucket = "/" not in name
    if os.path.isdir(local) and (is_bucket or self._holds_objects(local)):
      return {"name": name, "size": 0, "type": "directory"}
    raise FileNotFoundError(path)

  def ls(self, path, detail=True, **kwargs):
    info = self.info(path)
    entries = [info]
    if info["type"] == "directory":
      entries = []
      for child in sorted(os.listdir(self._local(path))):
        try:
          entries.append(self.info(f"{info['name']}/{child}"))
        except FileNotFoundError:  # an empty prefix: not there on a bucket
          pass
    return entries if detail else [entry["name"] for entry in entries]

  def _open(self, path, mode="rb", **kwargs):
    if mode == "rb":
      return open(self._local(path), "rb")
    if mode in ("wb", "xb"):
      if mode == "xb" and self.exists(path):
        raise FileExistsError(path)
      return _Upload(self._local(path))
    raise NotImplementedError(f"gs:// objects are written whole; no mode {mode!r}.")

  def mkdir(self, path, create_parents=True, **kwargs):
    del path, create_parents, kwargs  # prefixes need no creating

  def makedirs(self, path, exist_ok=False):
    del path, exist_ok

  def rmdir(self, path):
    del path

  def rm_file(self, path):
    local = self._local(path)
    if os.path.isfile(local):
      os.remove(local)

  def _rm(self, path):
    self.rm_file(path)

  def cp_file(self, path1, path2, **kwargs):
    if self.isdir(path1):
      return
    with open(self._local(path1), "rb") as f:
      _publish(self._local(path2), f.read())


class _Upload(io.BytesIO):
  """A file being written: the object appears, whole, when it is closed."""

  def __init__(self, local: str):
    super().__init__()
    self._local = local

  def close(self):
    if not self.closed:
      _publish(self._local, self.getvalue())
    super().close()


def _publish(local: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(local), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(local), prefix=".upload-")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, local)


def bucket_class(root: str) -> type:
  """A `FakeBucket` class serving gs:// from `root` (its own fsspec instance cache)."""
  return type("FakeBucketAt", (FakeBucket,), {"root": os.fspath(root)})


def install(root: str, setitem=None, setattr_=None) -> None:
  """Serves gs:// from `root` in this process: epath, orbax and TensorStore.

  * epath: its fsspec backend for gs:// (`EPATH_USE_TF=false`: not TensorFlow's
    gfile, which would go to the network) with `FakeBucket` as fsspec's `gs`/`gcs`.
  * orbax: TensorStore's kvstore for a gs:// path becomes its `file` driver on the
    same object files; the bucket is not hierarchical (orbax would ask GCS).

  `setitem`/`setattr_` (pytest's monkeypatch) undo it after a test; None = for good
  (a subprocess).
  """
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  setitem = setitem or (lambda mapping, key, value: mapping.__setitem__(key, value))
  setattr_ = setattr_ or setattr
  cls = bucket_class(root)
  setitem(os.environ, "EPATH_USE_TF", "false")
  # Should anything still try Google's credentials, the metadata server it asks
  # for them is a closed local port.
  for name in ("GCE_METADATA_HOST", "GCE_METADATA_IP"):
    setitem(os.environ, name, "127.0.0.1:9")
  setitem(os.environ, "NO_GCE_CHECK", "True")
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  # (`fsspec.registry` is also the name of its read-only view: the module's dict.)
  implementations = importlib.import_module("fsspec.registry")._registry  # pylint: disable=protected-access
  for protocol in PROTOCOLS:
    setitem(implementations, protocol, cls)
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access

  def kvstore(path: str) -> dict:
    return {"driver": "file", "path": os.path.join(root, cls._strip_protocol(path))}

  setattr_(gcs_utils, "get_kvstore_for_gcs", kvstore)
  setattr_(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)

  def no_client(name):
    raise AssertionError(f"orbax asked GCS's API for bucket {name!r}.")

  setattr_(gcs_utils, "get_bucket", no_client)


def uninstall() -> None:
  """Drops the caches `install` filled (after monkeypatch undid its changes)."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


if __name__ == "__main__":
  install(sys.argv.pop(1))
  from absl import app  # pylint: disable=g-import-not-at-top
  from simfluence_jax import main  # pylint: disable=g-import-not-at-top
  app.run(main.main, flags_parser=main.parse_flags)
