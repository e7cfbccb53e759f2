"""The committed fixture writer is deterministic for a seed (compared by decoded content)."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "write_fixtures", Path(__file__).resolve().parents[1] / "fixtures" / "write_fixtures.py")
write_fixtures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(write_fixtures)


def test_fixtures_are_reproducible():
    assert write_fixtures.check_reproducible(seed=0) == []


def test_different_seeds_give_different_pixels(tmp_path):
    write_fixtures.write_all(tmp_path / "a", seed=0)
    write_fixtures.write_all(tmp_path / "b", seed=1)
    a = write_fixtures.decoded_content(tmp_path / "a")
    b = write_fixtures.decoded_content(tmp_path / "b")
    assert a.keys() == b.keys() and any(a[k][2] != b[k][2] for k in a)
