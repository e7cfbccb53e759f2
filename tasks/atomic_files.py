"""Crash-safe file writes: write under a temporary name in the same folder, then rename over the target.

A process killed mid-write (``kill -9``, OOM killer, power cut) leaves either the previous complete
file or the new complete file at the target name, never a truncated one: ``os.replace`` within one
file system is atomic on POSIX and Windows. The temporary name starts with a dot and ends in
``.partial-<pid>-<n>``, so no reader's pattern (``epoch-*.pt``, ``*.onnx``, ``*.json``) ever matches it;
:func:`remove_partials` sweeps the leftovers of killed writers.
"""

from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PARTIAL_MARK = ".partial-"
_counter = itertools.count()


def partial_name(path: Path) -> Path:
    """The temporary sibling ``path`` is written under before it is renamed into place."""
    return path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}-{next(_counter)}")


def is_partial(path: Path) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_path` (complete or not, never a result)."""
    return path.name.startswith(".") and PARTIAL_MARK in path.name


def _fsync_folder(folder: Path) -> None:
    # The rename lives in the folder's entry table: sync it too, or a power cut may forget the rename.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms/file systems cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(path: Path | str, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit it replaces ``path`` in one rename.

    Any library that writes to a path (``torch.save``, ``onnx.save``, ONNX Runtime's quantizers) writes
    to the yielded path instead. If the block raises, the temporary file is removed and ``path`` is
    left as it was. With ``durable`` the data and the rename are flushed to disk (fsync) as well.

    Libraries that pick a format from the file extension must be told the format explicitly: the
    temporary name does not end in the target's suffix.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_name(target)
    try:
        yield temporary
        if not temporary.exists():
            raise FileNotFoundError(f"{target}: nothing was written to the temporary file {temporary.name}")
        if durable:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, target)
        if durable:
            _fsync_folder(target.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return ``path``."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _writer_alive(path: Path) -> bool:
    pid_text = path.name.rsplit(PARTIAL_MARK, 1)[-1].split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_partials(folder: Path | str, target: str | None = None) -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder`` (not recursive); return them.

    Only files whose writing process no longer exists are removed, so a live writer's temporary file
    (another process, or another thread of this one) is never pulled from under it. ``target`` limits
    the sweep to the temporaries of one file name.
    """
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    prefix = f".{target}{PARTIAL_MARK}" if target else "."
    for candidate in folder.iterdir():
        if (is_partial(candidate) and candidate.name.startswith(prefix) and candidate.is_file()
                and not _writer_alive(candidate)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed
