"""Guards every domain reader puts around its inputs: readable paths, size limits, and failures named by file.

A reader that meets a bad file must say which file and what is wrong with it (a
:class:`~domains.spec.DomainInputError`), never let a library's own exception, with its traceback, reach
the user; and it must refuse a source too large to hold from its header numbers, before any allocation.
"""

from __future__ import annotations

import errno
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from domains.spec import DomainInputError, printable_path

MAX_SOURCE_SAMPLES_ENV = "VITRAIL_MAX_SOURCE_SAMPLES"
DEFAULT_MAX_SOURCE_SAMPLES = 2**31
"""About 2.1e9 values (8.6 GB as float32): a full 13-band Sentinel-2 tile (1.6e9) or an EMIT capture (4.5e8)
fits, a header declaring a planet-sized raster does not."""


def max_source_samples() -> int:
    """The configured limit on values (pixels x bands x slices) in one source, from the environment.

    Raises:
        ValueError: the environment variable is set but not a positive integer.
    """
    raw = os.environ.get(MAX_SOURCE_SAMPLES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_SOURCE_SAMPLES
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{MAX_SOURCE_SAMPLES_ENV}={raw!r} is not a number of samples") from None
    if value < 1:
        raise ValueError(f"{MAX_SOURCE_SAMPLES_ENV}={raw!r} must be at least 1")
    return value


def check_source_size(path: Path | str, dims: tuple[int, ...], what: str = "source") -> None:
    """Refuse a source whose header declares more values than the configured limit.

    Args:
        path: the file whose header gave ``dims`` (named in the message).
        dims: the declared sizes, e.g. (lines, samples, bands).
        what: what the dimensions are, for the message (``"rows x columns x bands"``).

    Raises:
        DomainInputError: the product of ``dims`` exceeds :func:`max_source_samples`; the message gives
            the numbers and how to raise the limit.
    """
    total = math.prod(int(d) for d in dims)
    limit = max_source_samples()
    if any(int(d) < 0 for d in dims):
        raise DomainInputError(path, f"header declares negative dimensions {' x '.join(map(str, dims))} ({what})")
    if total > limit:
        raise DomainInputError(
            path,
            f"{' x '.join(str(int(d)) for d in dims)} ({what}) = {total:.3g} samples exceeds the limit of "
            f"{limit:.3g} (set {MAX_SOURCE_SAMPLES_ENV} to raise it, or cut the source into smaller parts)",
        )


def check_readable(path: Path | str, kind: str = "file") -> Path:
    """Raise a clear error when ``path`` cannot be read: missing, a looping or dangling link, no permission.

    Args:
        path: the input path.
        kind: ``"file"``, ``"folder"`` or ``"any"``: what the path must be.

    Returns:
        The path, as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise DomainInputError(path, "is a symbolic link that loops (it leads back to itself)") from None
        raise DomainInputError(path, f"is a symbolic link to {os.readlink(path)!r}, which does not exist") from None
    if not path.exists():
        raise DomainInputError(path, "does not exist")
    if kind == "file" and not path.is_file():
        raise DomainInputError(path, "is not a file")
    if kind == "folder" and not path.is_dir():
        raise DomainInputError(path, "is not a folder")
    # Read permission as the process sees it (root passes anyway, and then reading simply works).
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise DomainInputError(path, f"cannot be read: permission denied (mode {path.stat().st_mode & 0o777:o})")
    return path


def check_encodable_name(path: Path | str) -> None:
    """Refuse a path whose name is not valid UTF-8 before it reaches a library that cannot open it (GDAL)."""
    text = str(path)
    if text != printable_path(text):
        raise DomainInputError(path, "its name is not valid UTF-8, which GDAL cannot open; rename the file "
                                     "(e.g. convmv -f latin1 -t utf8)")


def describe_failure(error: BaseException) -> str:
    """One line saying what went wrong, for an exception a library raised on a bad file."""
    if isinstance(error, UnicodeError):
        return "its name or content is not valid text in the expected encoding"
    if isinstance(error, OSError) and error.strerror:
        return f"cannot be read: {error.strerror}"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


@contextmanager
def input_errors_named(path: Path | str) -> Iterator[None]:
    """Turn any failure while reading ``path`` into a :class:`DomainInputError` naming it.

    :class:`DomainInputError` passes through unchanged (it already names its file); ``MemoryError``,
    ``KeyboardInterrupt`` and ``SystemExit`` are never caught. The original exception stays chained, so
    its traceback is still there for whoever logs at debug level.
    """
    try:
        yield
    except (DomainInputError, MemoryError):
        raise
    except Exception as error:
        raise DomainInputError(path, f"cannot be read ({describe_failure(error)})") from error
