"""Guards on inputs and outputs: names confined to the output folder, size limits from headers, named failures."""

from __future__ import annotations

import os

import numpy as np
import pytest

from domains import DomainInputError, PredictionRequest, PredictionSummary
from domains.confinement import MAX_NAME_BYTES, confined_path, safe_component
from domains.input_guards import (MAX_SOURCE_SAMPLES_ENV, check_readable, check_source_size, input_errors_named,
                                  max_source_samples)

HOSTILE_NAMES = ["../../etc/x", "/etc/passwd", "a/b\\c", "..", ".", "", ".hidden", "nul\x00byte", "tab\tand\nnewline",
                 os.fsdecode(b"caf\xe9-\xff"), "x" * 400, "ü" * 200, "C:\\Windows\\system32", "~/.ssh/id_rsa"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_any_name_becomes_one_harmless_component(name, tmp_path):
    safe = safe_component(name)
    assert safe and "/" not in safe and "\\" not in safe and "\x00" not in safe and not safe.startswith(".")
    assert len(safe.encode()) <= MAX_NAME_BYTES
    target = confined_path(tmp_path, name, ".plumes.json")
    assert target.parent == tmp_path
    target.write_text("ok")  # the file system takes it
    assert target.resolve().parent == tmp_path.resolve()


def test_names_that_had_to_change_do_not_collide():
    assert safe_component("a/b") != safe_component("a_b") and safe_component("a_b") == "a_b"
    assert safe_component("x" * 400) != safe_component("x" * 401)
    assert safe_component("S2_T18_B04.tif") == "S2_T18_B04.tif"


def test_a_link_in_the_output_folder_cannot_redirect_a_write(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "scene.tif").symlink_to(outside / "scene.tif")
    with pytest.raises(DomainInputError, match="outside the output folder"):
        confined_path(out, "scene", ".tif")


def test_predict_names_outputs_inside_the_output_folder_whatever_the_domain_says(tmp_path):
    from dataclasses import replace

    from domains import get_domain
    from tasks.prediction import prediction_target

    spec = get_domain("radiology")
    for hostile in ("../../../tmp/escaped", "/etc/cron.d/job", "a/../../b"):
        domain = replace(spec, name_prediction=lambda path, name=hostile: name)
        target = prediction_target(domain, tmp_path / "input", tmp_path / "out")
        assert target.parent == tmp_path / "out" and target.name.endswith(spec.prediction_suffix)
    scene = tmp_path / "drop" / "S2_scene.tif"
    scene.parent.mkdir()
    scene.write_bytes(b"")
    plain = replace(get_domain("satellite"), name_prediction=None)
    assert prediction_target(plain, scene, tmp_path / "out").name == "S2_scene.tif"


def test_a_source_over_the_limit_is_refused_with_the_numbers(monkeypatch):
    with pytest.raises(DomainInputError) as error:
        check_source_size("scene.tif", (10**6, 10**6, 13), "rows x columns x bands")
    message = str(error.value)
    assert "scene.tif" in message and "1000000 x 1000000 x 13" in message and "1.3e+13" in message
    assert MAX_SOURCE_SAMPLES_ENV in message
    monkeypatch.setenv(MAX_SOURCE_SAMPLES_ENV, "1e14")
    assert max_source_samples() == 10**14
    check_source_size("scene.tif", (10**6, 10**6, 13))  # raised limit: accepted
    monkeypatch.setenv(MAX_SOURCE_SAMPLES_ENV, "100")
    with pytest.raises(DomainInputError, match="exceeds the limit of 100"):
        check_source_size("small.tif", (11, 10))
    monkeypatch.setenv(MAX_SOURCE_SAMPLES_ENV, "lots")
    with pytest.raises(ValueError, match=MAX_SOURCE_SAMPLES_ENV):
        max_source_samples()


def test_the_limit_applies_to_real_readers_from_the_header(tmp_path, monkeypatch):
    from domains import IngestRequest, get_domain

    example = get_domain("hyperspectral").write_example(tmp_path / "cube")
    monkeypatch.setenv(MAX_SOURCE_SAMPLES_ENV, "1000")
    with pytest.raises(DomainInputError, match=r"48 x 48 x 120 \(lines x samples x bands\) = 2.76e\+05 samples"):
        get_domain("hyperspectral").read_samples(IngestRequest(source=example["source"], tile_size=8, block_size=16))


def test_links_that_loop_or_dangle_and_missing_paths_are_named(tmp_path):
    loop = tmp_path / "loop.tif"
    loop.symlink_to(tmp_path / "back.tif")
    (tmp_path / "back.tif").symlink_to(loop)
    with pytest.raises(DomainInputError, match="loops"):
        check_readable(loop)
    dangling = tmp_path / "dangling.tif"
    dangling.symlink_to(tmp_path / "gone.tif")
    with pytest.raises(DomainInputError, match="gone.tif.*does not exist"):
        check_readable(dangling)
    with pytest.raises(DomainInputError, match="does not exist"):
        check_readable(tmp_path / "absent.tif")


def test_unexpected_failures_become_errors_naming_the_file_but_memory_errors_pass():
    with pytest.raises(DomainInputError, match=r"cube.hdr: cannot be read \(ZeroDivisionError"):
        with input_errors_named("cube.hdr"):
            1 / 0
    with pytest.raises(MemoryError):
        with input_errors_named("cube.hdr"):
            raise MemoryError
    with pytest.raises(KeyboardInterrupt):
        with input_errors_named("cube.hdr"):
            raise KeyboardInterrupt


def test_a_radiograph_without_a_usable_field_of_view_is_quarantined_and_the_rest_kept(tmp_path, collect):
    """Issue 9, defect 2: zero pixel spacing made square_layout divide by zero and aborted the whole ingest."""
    import json

    import pydicom

    from domains import IngestRequest
    from domains.radiology.examples import EXAMPLE_PATIENTS, write_example
    from domains.radiology.intensity import FieldOfViewError, square_layout
    from domains.radiology.sampling import read_samples

    with pytest.raises(FieldOfViewError, match="no usable field of view"):
        square_layout(64, 64, (0.0, 0.0), 32)
    with pytest.raises(FieldOfViewError):
        square_layout(64, 64, (float("nan"), 1.0), 32)
    source = write_example(tmp_path)["source"]
    radiograph = next((source / EXAMPLE_PATIENTS[2]).glob("*.dcm"))
    ds = pydicom.dcmread(radiograph)
    ds.ImagerPixelSpacing = [0, 0]
    ds.save_as(radiograph)
    good = collect(read_samples(IngestRequest(source=source, tile_size=8)))
    assert good.dropped == {"degenerate_field_of_view": 1} and len(good.images) == 9
    [entry] = good.quarantine
    assert entry["reason"] == "degenerate_field_of_view" and "field of view" in entry["problem"]
    assert json.loads(good.provenance["quarantine"]) == good.quarantine


def test_an_unexpected_failure_of_one_series_quarantines_only_that_series(tmp_path, monkeypatch, collect):
    from domains import IngestRequest
    from domains.radiology import sampling
    from domains.radiology.examples import write_example

    source = write_example(tmp_path)["source"]
    real = sampling.series_images

    def fails_on_mr(series, recipes, size):
        if series.modality == "MR":
            raise RuntimeError("a decoder bug")
        return real(series, recipes, size)

    monkeypatch.setattr(sampling, "series_images", fails_on_mr)
    samples = collect(sampling.read_samples(IngestRequest(source=source, tile_size=8)))
    assert samples.dropped == {"unusable_series": 3} and len(samples.images) == 7
    assert "RuntimeError: a decoder bug" in samples.quarantine[0]["problem"]


def test_predict_reports_any_per_input_failure_and_keeps_going(tmp_path, monkeypatch):
    """A bug on one input (not a DomainInputError) is reported as that input's failure; the others are predicted."""
    from dataclasses import replace

    from domains import Channel, get_domain
    from tasks import prediction

    calls: list[str] = []

    def flaky_predict(request: PredictionRequest) -> PredictionSummary:
        calls.append(request.input.name)
        if request.input.name == "b":
            raise ZeroDivisionError("float division by zero")
        request.output.write_text("{}")
        return PredictionSummary(input=str(request.input), output=str(request.output), samples=1, class_counts={})

    drop = tmp_path / "drop"
    for name in "abc":
        (drop / name).mkdir(parents=True)
    domain = replace(get_domain("radiology"), predict=flaky_predict, list_prediction_inputs=lambda p: sorted(p.iterdir()),
                     name_prediction=lambda p: p.name)
    model = prediction.LoadedModel(uri="m", flavor="onnx", predict_logits=lambda x: np.zeros((len(x), 1)),
                                   channels=(Channel("image"),), class_names=("a", "b"), tile_size=8, domain="radiology")
    monkeypatch.setattr(prediction, "get_domain", lambda name: domain)
    monkeypatch.setattr(prediction, "load_model", lambda uri, threads=2: model)
    batch = prediction.predict_inputs("radiology", "m", drop, tmp_path / "out")
    assert calls == ["a", "b", "c"] and len(batch.written) == 2
    assert list(batch.failed) == [str(drop / "b")] and "ZeroDivisionError" in batch.failed[str(drop / "b")]
