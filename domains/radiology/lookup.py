"""Find which input files pseudonymous file keys (``f-...``) stand for, on the operator's own machine.

Quarantine records, errors and the de-identification audit name files only by keyed hash, because
file and folder names often carry patient identity. Whoever holds the source (and the salt in
``VITRAIL_DEID_SALT``, if one was set at ingest) can map keys back by hashing the source's files again;
nothing identifying is ever stored::

    python -m domains.radiology.lookup SOURCE f-d11c5977056d [f-... ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path, PurePosixPath

from domains.radiology.deidentify import pseudonym
from domains.radiology.source import discover_files


def resolve_file_keys(source: Path | str, keys: list[str]) -> dict[str, Path | None]:
    """Map each key to the file of ``source`` it was computed from, or None when no file matches."""
    root, paths = discover_files(Path(source))
    wanted = set(keys)
    found: dict[str, Path] = {}
    for path in paths:
        try:
            relative = PurePosixPath(path.relative_to(root).as_posix())
        except ValueError:  # the reader keys files a DICOMDIR lists outside its folder by name
            relative = PurePosixPath(path.name)
        key = pseudonym("file", relative.as_posix())
        if key in wanted:
            found[key] = path
    return {key: found.get(key) for key in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m domains.radiology.lookup", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the source folder, file or DICOMDIR given to ingest or predict")
    parser.add_argument("keys", nargs="+", help="pseudonymous file keys (f-...) from a quarantine record or the audit")
    args = parser.parse_args(argv)
    missing = 0
    for key, path in resolve_file_keys(args.source, args.keys).items():
        print(f"{key}\t{path if path else 'no file of this source (other source, or another VITRAIL_DEID_SALT)'}")
        missing += path is None
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
