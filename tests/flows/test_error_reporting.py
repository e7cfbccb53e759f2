"""Bad input reads as one sentence (terminal and Prefect state); unexpected errors keep their tracebacks."""

from __future__ import annotations

import logging

import pytest

from domains import DomainInputError
from flows.cli import main
from flows.error_reporting import QuietInputErrors, describe_error


def _latest_flow_run(flow_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    return runs[0]


def test_truncated_band_is_one_line_in_the_terminal_and_the_flow_state(tmp_path):
    """The real console: a fresh process with its own ephemeral Prefect server, as a user runs it."""
    import os
    import re
    import subprocess
    import sys

    from domains import get_domain

    scene = get_domain("satellite").write_example(tmp_path / "scene")["source"]
    band = sorted(scene.rglob("*_B04.tif"))[0]
    band.write_bytes(band.read_bytes()[: band.stat().st_size // 3])
    out_dir = tmp_path / "dataset"
    # Its own ephemeral server: no API URL at all (an empty one breaks Prefect's event client).
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_LOGGING_LEVEL="INFO")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", "--domain", "satellite", "--source",
                           str(scene), "--out", str(out_dir)], capture_output=True, text=True, env=env, timeout=300)
    terminal = done.stdout + done.stderr
    assert done.returncode == 2, terminal
    assert "Traceback" not in terminal
    errors = [line for line in done.stderr.splitlines() if line.startswith("vitrail ingest: error:")]
    assert len(errors) == 1 and band.name in errors[0]
    sentence = errors[0].removeprefix("vitrail ingest: error: ")
    # Prefect's own record of the flow run's final state carries exactly that sentence.
    final = re.search(r"Flow run '[^']+' - Finished in state Failed\('(.*)'\)", terminal)
    assert final is not None and final.group(1) == sentence
    assert not (out_dir / "dataset.json").exists()


def test_flow_failing_on_input_states_exactly_the_sentence(tmp_path, capfd):
    missing = tmp_path / "not-a-dataset"
    missing.mkdir()
    code = main(["validate", "--domain", "satellite", "--dataset", str(missing), "--model", "runs:/x/model",
                 "--compress-run", "x", "--workdir", str(tmp_path / "work")])
    captured = capfd.readouterr()
    assert code == 2 and "Traceback" not in captured.out + captured.err
    run = _latest_flow_run("validate-model")
    line = next(line for line in captured.err.splitlines() if line.startswith("vitrail validate: error:"))
    assert run.state.is_failed()
    assert run.state.message == line.removeprefix("vitrail validate: error: ")
    assert str(missing) in run.state.message


def _record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException as raised:  # noqa: BLE001 - building a record with real exc_info
        import sys

        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed with "
                                 "exception: %r", (raised,), sys.exc_info())


@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs")
def test_filter_drops_the_traceback_of_input_errors_only(caplog):
    quiet = QuietInputErrors()
    bad_input = _record(DomainInputError("/data/scene/B04.tif", "truncated: 120 of 4096 rows readable"))
    bug = _record(ZeroDivisionError("float division by zero"))
    with caplog.at_level(logging.DEBUG, logger="prefect.task_runs"):
        assert quiet.filter(bad_input) and quiet.filter(bug)
    assert bad_input.exc_info is None
    assert bug.exc_info is not None and bug.exc_info[0] is ZeroDivisionError
    # the input error's traceback is still there for whoever turns on DEBUG
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug and "Traceback" in debug[0].getMessage() and "B04.tif" in debug[0].getMessage()


def test_unexpected_errors_keep_their_traceback_in_the_cli(monkeypatch, capsys):
    import flows.cli

    def broken(args):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(flows.cli, "run", broken)
    with pytest.raises(ZeroDivisionError):
        main(["domains"])


def test_invalid_parameters_are_described_by_field():
    from pydantic import ValidationError

    from flows.ingest import IngestParams

    with pytest.raises(ValidationError) as info:
        IngestParams(source="x", out="y", tiling={"tile_size": 3})
    assert describe_error(info.value).startswith("invalid parameters: tiling.tile_size:")
