"""Operators can map pseudonymous file keys back to their own files; nothing identifying is stored."""

from __future__ import annotations

from pathlib import Path

from domains import get_domain
from domains.radiology.lookup import main, resolve_file_keys
from domains.radiology.source import read_source


def test_every_file_key_resolves_to_the_file_it_was_made_from(tmp_path: Path, capsys) -> None:
    example = get_domain("radiology").write_example(tmp_path / "input")
    files = read_source(example["source"]).files
    resolved = resolve_file_keys(example["source"], [f.key for f in files] + ["f-000000000000"])
    assert all(resolved[f.key] == f.path for f in files)
    assert resolved["f-000000000000"] is None
    assert main([str(example["source"]), files[0].key]) == 0
    assert str(files[0].path) in capsys.readouterr().out
    assert main([str(example["source"]), "f-000000000000"]) == 1
