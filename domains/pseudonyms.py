"""Keyed pseudonyms for identifying values (patient IDs, file names), shared by every domain that reads people's data.

A pseudonym is HMAC-SHA256 of the original value keyed with a salt. The salt is the environment variable
``VITRAIL_DEID_SALT`` when set, else a fixed project salt. The fixed salt makes keys stable across
machines and runs (two ingests of the same cohort agree), but anyone with this code can recompute the key
of a guessed patient ID (MRNs are short and guessable), so a site that shares datasets outside its walls
should set its own secret salt. The salt kind may be recorded in a provenance, never the salt itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os

SALT_ENV = "VITRAIL_DEID_SALT"
# The first domain to use it was radiology; the value stays so that keys of existing datasets do not change.
PROJECT_SALT = "vitrail-radiology-pseudonyms-v1"
PREFIXES = {"patient": "p", "study": "st", "series": "se", "file": "f", "slide": "sl", "site": "si"}


def deidentification_salt() -> tuple[bytes, str]:
    """The pseudonym salt and its kind (``user`` from ``VITRAIL_DEID_SALT``, or ``project``)."""
    user = os.environ.get(SALT_ENV, "")
    if user:
        return user.encode(), "user"
    return PROJECT_SALT.encode(), "project"


def keyed_digest(kind: str, value: str) -> bytes:
    """HMAC-SHA256 of ``kind`` and ``value`` under the current salt (32 bytes)."""
    salt, _ = deidentification_salt()
    # surrogateescape: a file name that is not UTF-8 (Linux names are bytes) still hashes, to the same key as
    # its raw bytes would; every valid UTF-8 value hashes exactly as before.
    return hmac.new(salt, f"{kind}\x00{value}".encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def pseudonym(kind: str, value: str, length: int = 12) -> str:
    """Keyed, non-reversible key of ``value`` for one kind (``patient``, ``study``, ``series``, ``file``, ``slide``...).

    The kind is part of the hashed message, so a patient ID and a file name that happen to be equal do not
    share a key. The result is ``<prefix>-<hex>`` with the kind's prefix from :data:`PREFIXES` (``p``,
    ``st``, ``se``, ``f``, ``sl``, ``si``; another kind uses its first letter).
    """
    return f"{PREFIXES.get(kind, kind[0])}-{keyed_digest(kind, value).hex()[:length]}"
