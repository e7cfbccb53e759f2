"""Folders that may be URLs: a local path or any fsspec location (``s3://bucket/prefix``), one interface.

Datasets, checkpoints, reports and predictions are written through :class:`StorageFolder`, so a work
folder on object storage is seen by every worker that can reach the bucket. Credentials and endpoints
come from the standard places (``AWS_*`` environment variables, ``~/.aws``, fsspec configuration);
nothing here names a host.

Whole-file writes are all-or-nothing in both places, by different means:

- local: the file is written under a temporary sibling name and renamed into place
  (:mod:`tasks.atomic_files`), so a killed writer leaves the previous file or the new one;
- object store: the object is uploaded to its final key once, when it is complete. An S3 (or GCS,
  Azure) object becomes visible only when its upload finishes (a multipart upload only at its
  ``CompleteMultipartUpload``), so readers never see a truncated object and no rename is needed.

Libraries that can only write or read real files (``torch.save``, ONNX Runtime, GDAL) get a local
file from :meth:`StorageFolder.writing` or a local folder from :func:`staged_folder`, which are
uploaded when the block ends without an error.
"""

from __future__ import annotations

import fnmatch
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

from tasks.atomic_files import atomic_path, is_partial, remove_partials, write_bytes_atomic


def as_location(location: str | Path) -> str:
    """``location`` as text, with a URL that went through ``pathlib.Path`` repaired.

    ``Path("s3://bucket/x")`` prints as ``s3:/bucket/x``; callers that wrap every location argument in
    ``Path`` would otherwise turn an object-store URL into a local folder named ``s3:``.
    """
    text = str(location)
    protocol, sep, rest = text.partition(":/")
    if sep and not rest.startswith("/") and protocol.isalnum() and len(protocol) > 1:
        from fsspec.registry import known_implementations

        if protocol in known_implementations and protocol not in ("file", "local"):
            return f"{protocol}://{rest}"
    return text


def is_url(location: str | Path) -> bool:
    """Whether ``location`` names an fsspec URL (``s3://bucket/prefix``) rather than a local path."""
    text = as_location(location)
    return "://" in text and not text.startswith("file://")


def join_location(base: str | Path, *parts: str) -> str:
    """``base`` with ``parts`` appended: ``s3://b/work`` + ``checkpoints`` is ``s3://b/work/checkpoints``.

    A local result is absolute (resolved), as receipts and later stages need it.
    """
    if is_url(base):
        return "/".join([as_location(base).rstrip("/"), *(str(p).strip("/") for p in parts)])
    return str(Path(base, *parts).resolve())


def location_name(location: str | Path) -> str:
    """The last part of a path or URL (``s3://b/work/predictions`` -> ``predictions``)."""
    return PurePosixPath(as_location(location).rstrip("/")).name if is_url(location) else Path(location).name


def parent_location(location: str | Path) -> str:
    """The folder or prefix holding ``location``."""
    if is_url(location):
        text = as_location(location).rstrip("/")
        head, _, _ = text.rpartition("/")
        if head.endswith(":/") or "://" not in head:
            raise ValueError(f"{location}: a bucket has no parent location")
        return head
    return str(Path(location).resolve().parent)


def open_location(location: str | Path, mode: str = "rb"):
    """An fsspec ``OpenFile`` for a path or URL (use it as a context manager)."""
    import fsspec

    return fsspec.open(as_location(location) if is_url(location) else str(location), mode)


class StorageFolder:
    """One folder of files at a local path or under an fsspec URL prefix; keys are ``/``-separated names.

    Pickles by its location (its file-system object is re-made where it is unpickled), so it can go to
    DataLoader workers and spawned training processes.
    """

    def __init__(self, location: str | Path):
        self.remote = is_url(location)
        self.location = as_location(location).rstrip("/") if self.remote else str(Path(location))
        self._connect()

    def _connect(self) -> None:
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(self.location)

    def __getstate__(self) -> dict:
        return {"remote": self.remote, "location": self.location}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._connect()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    def describe(self, key: str = "") -> str:
        """Full path or URL of ``key``, for messages."""
        return f"{self.location}/{key}" if key else self.location

    def reference(self, key: str) -> Path | str:
        """What to hand another function to reach ``key``: a local ``Path``, or the URL text."""
        return f"{self.location}/{key}" if self.remote else Path(self.location) / key

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def makedirs(self) -> None:
        """Create the folder (local); a prefix on an object store needs no creating."""
        if not self.remote:
            Path(self.location).mkdir(parents=True, exist_ok=True)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def open(self, key: str, mode: str = "rb"):
        """A file object of ``key`` (seekable for reading; torch.load and pyarrow accept it)."""
        return self.fs.open(self._path(key), mode)

    def write_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` to ``key`` all-or-nothing (see the module docstring); return its path or URL."""
        if self.remote:
            self.fs.pipe_file(self._path(key), data)
        else:
            write_bytes_atomic(Path(self.location) / key, data)
        return self.describe(key)

    def write_text(self, key: str, text: str) -> str:
        return self.write_bytes(key, text.encode("utf-8"))

    @contextmanager
    def writing(self, key: str) -> Iterator[Path]:
        """Yield a local path to write ``key`` to; it is published at ``key`` when the block ends cleanly.

        Locally it is :func:`tasks.atomic_files.atomic_path` (a temporary sibling renamed into place);
        on an object store it is a file in a private temporary folder, uploaded to the final key once
        complete. If the block raises, nothing is published and the temporary file is removed.
        """
        if not self.remote:
            with atomic_path(Path(self.location) / key) as partial:
                yield partial
            return
        scratch = Path(tempfile.mkdtemp(prefix="vitrail-upload-"))
        try:
            local = scratch / PurePosixPath(key).name  # keeps the suffix, for libraries that read it
            yield local
            if not local.exists():
                raise FileNotFoundError(f"{self.describe(key)}: nothing was written to upload")
            self.fs.put_file(str(local), self._path(key))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def upload(self, local: Path, key: str) -> str:
        """Copy the local file ``local`` to ``key`` all-or-nothing; return its path or URL."""
        if self.remote:
            self.fs.put_file(str(local), self._path(key))
        else:
            with atomic_path(Path(self.location) / key) as partial:
                shutil.copyfile(local, partial)
        return self.describe(key)

    def remove(self, key: str) -> None:
        if self.exists(key):
            self.fs.rm(self._path(key))

    def _fresh_listing(self) -> None:
        # s3fs caches listings per process; another worker may have written since.
        if self.remote:
            self.fs.invalidate_cache(self.root)

    def glob(self, pattern: str) -> list[str]:
        """Names directly in the folder that match ``pattern`` (fnmatch), sorted; never a partial write."""
        self._fresh_listing()
        if not self.fs.isdir(self.root):
            return []
        names = (PurePosixPath(entry).name for entry in self.fs.ls(self.root, detail=False))
        return sorted(name for name in names if fnmatch.fnmatchcase(name, pattern) and not is_partial(Path(name)))

    def keys(self) -> list[str]:
        """Every file below the location, relative to it."""
        self._fresh_listing()
        if not self.fs.exists(self.root):
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p.removeprefix(prefix) for p in self.fs.find(self.root))

    def total_bytes(self) -> int:
        """Bytes of every file below the location."""
        return int(sum(self.fs.sizes([self._path(k) for k in self.keys()]) or [0]))

    def clear(self) -> None:
        """Remove every file below the location."""
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def remove_partials(self) -> list[str]:
        """Sweep temporary files of killed local writers; an object store holds none (uploads are whole)."""
        if self.remote:
            return []
        return [str(p) for p in remove_partials(self.location)]


@contextmanager
def staged_folder(location: str | Path) -> Iterator[Path]:
    """A local folder whose files end up at ``location`` (a folder or URL prefix).

    Locally it is ``location`` itself (created). For a URL it is a fresh temporary folder; when the
    block ends cleanly every file in it (partial writes excepted) is uploaded under ``location`` with
    the same relative name, and the temporary folder is removed either way. For libraries that need
    real files: ONNX Runtime's quantizers, GDAL's writers.
    """
    if not is_url(location):
        folder = Path(location)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    target = StorageFolder(location)
    scratch = Path(tempfile.mkdtemp(prefix="vitrail-stage-"))
    try:
        yield scratch
        for path in sorted(scratch.rglob("*")):
            if path.is_file() and not is_partial(path):
                target.upload(path, path.relative_to(scratch).as_posix())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def staged_reference(local: Path, scratch: Path, location: str | Path) -> str:
    """Where a file written under ``scratch`` by :func:`staged_folder` (for ``location``) ends up."""
    if not is_url(location):
        return str(local)
    local, scratch = Path(local), Path(scratch)
    if not local.is_relative_to(scratch):  # a writer that resolved its path (e.g. /tmp behind a symlink)
        local, scratch = local.resolve(), scratch.resolve()
    return f"{as_location(location).rstrip('/')}/{local.relative_to(scratch).as_posix()}"

