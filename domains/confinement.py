"""Output paths confined to the folder the user gave: names from inputs cannot climb out of it.

Input file names, DICOM attributes, sample ids and prediction names are data, not paths: ``../../etc/x``,
an absolute path, a separator, a NUL byte, bytes that are not UTF-8 or a name longer than the file system
allows must all become one harmless file name inside the output folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path

from domains.spec import DomainInputError

MAX_NAME_BYTES = 180
"""Longest name produced, in UTF-8 bytes: leaves room for suffixes (``.plumes.json``) under the usual
255-byte limit of Linux and macOS file systems."""
_UNSAFE = re.compile(r"[^\w.+=@,-]")


def safe_component(name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """Turn any text into one file name that stays where it is put.

    Separators, control characters and anything outside letters, digits and ``._-+=@,`` become ``_``;
    leading dots go (no ``..``, no hidden files); an empty result becomes ``unnamed``; bytes that are not
    UTF-8 (Linux names are bytes) are replaced. A name that had to change, or is cut to ``max_bytes``, gets
    ``-<8 hex digits of its hash>`` appended, so two different inputs never share an output name.
    """
    raw = os.fsencode(name) if isinstance(name, str) else bytes(name)
    text = unicodedata.normalize("NFC", raw.decode("utf-8", errors="replace"))
    cleaned = _UNSAFE.sub("_", text).lstrip(".").strip() or "unnamed"
    digest = hashlib.sha256(raw).hexdigest()[:8]
    changed = cleaned != name
    budget = max_bytes - (9 if changed or len(cleaned.encode()) > max_bytes else 0)
    if len(cleaned.encode()) > budget:
        cleaned = cleaned.encode()[:budget].decode("utf-8", errors="ignore").rstrip(".") or "unnamed"
        changed = True
    return f"{cleaned}-{digest}" if changed else cleaned


def confined_path(root: Path | str, name: str, suffix: str = "") -> Path:
    """``root / (safe_component(name) + suffix)``, checked to resolve inside ``root``.

    Raises:
        DomainInputError: the path would resolve outside ``root`` (e.g. an existing symbolic link there
            pointing elsewhere).
    """
    root = Path(root)
    target = root / f"{safe_component(name)}{suffix}"
    ensure_inside(root, target)
    return target


def ensure_inside(root: Path | str, target: Path | str) -> Path:
    """Return ``target`` when it resolves inside ``root`` (links followed); raise otherwise."""
    root_resolved = Path(root).resolve()
    resolved = Path(target).resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise DomainInputError(target, f"resolves to {resolved}, outside the output folder {root_resolved}; "
                                       "refusing to write there")
    return Path(target)
