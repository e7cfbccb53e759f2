"""The command line: every verb has --help, and bad input ends with a clear one-line error."""

import subprocess
import sys

import pytest

from flows.cli import build_parser, main

VERBS = ["demo", "domains", "ingest", "finetune", "compress", "validate", "promote", "predict", "pipeline"]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: vitrail " + verb in capsys.readouterr().out


def test_console_script_help_is_fast_and_lists_verbs():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for verb in VERBS:
        assert verb in out


def test_domains_lists_the_registry(capsys):
    assert main(["domains"]) == 0
    assert "satellite" in capsys.readouterr().out


def test_ingest_missing_source_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-scene"
    code = main(["ingest", "--source", str(missing), "--out", str(tmp_path / "ds")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "error" in err


def test_override_must_be_key_value():
    from flows.cli import _apply_overrides

    assert _apply_overrides({}, ["train.epochs=3", "lora.target_modules=[\"qkv\",\"fc1\"]"]) == {
        "train": {"epochs": 3}, "lora": {"target_modules": ["qkv", "fc1"]}}
    with pytest.raises(SystemExit):
        _apply_overrides({}, ["train.epochs"])
