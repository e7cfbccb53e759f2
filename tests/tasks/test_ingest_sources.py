"""Many sources into one dataset: per-source parts, resume, bad sources, and the combine step.

Real satellite scenes written by the domain's own example writer (13 GeoTIFF bands each); the plain
task functions are called here, the Prefect flow (runners, kill -9) in tests/flows.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from tasks_support import CHANNELS, make_samples

from domains import Channel, IngestRequest
from tasks.dataset import SplitParams, load_dataset, write_dataset
from tasks.dataset_parts import PART_FILE, read_part_info
from tasks.dataset_store import DatasetError
from tasks.ingest_sources import assemble_dataset, ingest_source, part_key, parts_root, plan_ingest
from tasks.request_errors import RequestError

REQUEST = IngestRequest(source=Path("."), tile_size=12, stride=12, block_size=12)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Two labelled scenes (same granule name, different pixels: two copies of one place) and a broken file."""
    from domains.satellite.examples import write_example

    root = tmp_path_factory.mktemp("scenes")
    broken = root / "broken" / "T18SUJ_broken.tif"
    broken.parent.mkdir()
    broken.write_bytes(b"II*\x00" + b"\x00" * 60)  # a TIFF header and nothing after it
    return {"a": write_example(root / "a", seed=0), "b": write_example(root / "b", seed=1),
            "broken": {"scene_dir": broken, "labels": None}}


def _ingest(names: list[str], scenes, out: Path, keep_parts: bool = False, request: IngestRequest = REQUEST):
    sources = [str(scenes[n]["scene_dir"]) for n in names]
    labels = [str(scenes[n]["labels"]) if scenes[n]["labels"] else None for n in names]
    plan = plan_ingest("satellite", request, sources, labels, str(out))
    outcomes = [ingest_source(job) for job in plan.jobs]
    return plan, outcomes, assemble_dataset(plan, outcomes, SplitParams(seed=1), keep_parts=keep_parts)


def test_two_sources_become_one_dataset_where_no_group_is_in_two_splits(tmp_path: Path, scenes) -> None:
    plan, outcomes, info = _ingest(["a", "b"], scenes, tmp_path / "ds")
    assert [o.status for o in outcomes] == ["written", "written"] and plan.resumed == 0
    assert info.sources == (str(scenes["a"]["scene_dir"]), str(scenes["b"]["scene_dir"]))
    dataset = load_dataset(tmp_path / "ds")
    assert sum(len(split) for split in dataset.splits.values()) == sum(o.samples for o in outcomes) == 48
    assert all(len(dataset.splits[s]) for s in ("train", "val", "test"))
    split_of_group: dict[str, set[str]] = {}
    for name, split in dataset.splits.items():
        for group in split.groups.tolist():
            split_of_group.setdefault(group, set()).add(name)
    assert all(len(splits) == 1 for splits in split_of_group.values())
    # The two scenes are one place (same granule): its blocks are shared groups, so each block of both is in
    # one split; prefixing the ids per source would have let the same place land in train and test.
    import pyarrow.parquet as pq

    manifest = pq.read_table(tmp_path / "ds" / "manifest.parquet").to_pydict()
    sources_of_group: dict[str, set[str]] = {}
    for group, source in zip(manifest["group"], manifest["source"]):
        sources_of_group.setdefault(group, set()).add(source)
    assert any(len(s) == 2 for s in sources_of_group.values())
    assert not Path(parts_root(str(tmp_path / "ds"))).exists()  # parts removed once combined
    assert json.loads((tmp_path / "ds" / "quarantine.json").read_text()) == []


def test_the_combined_dataset_does_not_depend_on_where_it_was_written(tmp_path: Path, scenes) -> None:
    _, _, first = _ingest(["a", "b"], scenes, tmp_path / "one")
    _, _, second = _ingest(["a", "b"], scenes, tmp_path / "two", keep_parts=True)
    assert first.digest == second.digest
    _, _, swapped = _ingest(["b", "a"], scenes, tmp_path / "three")
    assert swapped.digest != first.digest  # the order of sources is the order of samples, so part of the identity


def test_a_bad_source_is_quarantined_and_the_others_are_kept(tmp_path: Path, scenes) -> None:
    _, outcomes, info = _ingest(["a", "broken", "b"], scenes, tmp_path / "ds")
    assert [o.status for o in outcomes] == ["written", "failed", "written"]
    assert info.sources == (str(scenes["a"]["scene_dir"]), str(scenes["b"]["scene_dir"]))
    [entry] = json.loads((tmp_path / "ds" / "quarantine.json").read_text())
    assert entry["item"] == str(scenes["broken"]["scene_dir"]) and entry["reason"] == "unreadable_source"
    assert entry["problem"].startswith(str(scenes["broken"]["scene_dir"])) and "\n" not in entry["problem"]
    assert info.quarantined == 1
    assert not (Path(outcomes[1].part)).exists()  # nothing half-written is left for the failed source


def test_when_no_source_yields_samples_the_ingest_fails_naming_each(tmp_path: Path, scenes) -> None:
    missing = {"scene_dir": tmp_path / "nowhere.tif", "labels": None}
    with pytest.raises(DatasetError, match="no source yielded samples") as error:
        _ingest(["broken", "missing"], {**scenes, "missing": missing}, tmp_path / "ds")
    assert str(scenes["broken"]["scene_dir"]) in str(error.value) and "nowhere.tif" in str(error.value)
    assert not (tmp_path / "ds").exists()


def test_a_finished_part_is_not_read_again(tmp_path: Path, scenes, monkeypatch) -> None:
    plan, _, _ = _ingest(["a", "b"], scenes, tmp_path / "ds", keep_parts=True)
    markers = {job.key: os.stat(Path(job.part) / PART_FILE) for job in plan.jobs}
    import domains.satellite

    def refuse(request):
        raise AssertionError(f"{request.source} was read again")

    monkeypatch.setattr(domains.satellite, "SPEC", replace(domains.satellite.SPEC, read_samples=refuse))
    rerun, outcomes, _ = _ingest(["a", "b"], scenes, tmp_path / "ds", keep_parts=True)
    assert rerun.resumed == 2 and [o.status for o in outcomes] == ["resumed", "resumed"]
    for job in rerun.jobs:
        after = os.stat(Path(job.part) / PART_FILE)
        assert (after.st_ino, after.st_mtime_ns) == (markers[job.key].st_ino, markers[job.key].st_mtime_ns)


def test_an_unfinished_part_is_written_again(tmp_path: Path, scenes) -> None:
    sources, labels = [str(scenes["a"]["scene_dir"]), str(scenes["b"]["scene_dir"])], [None, None]
    plan = plan_ingest("satellite", REQUEST, sources, labels, str(tmp_path / "ds"))
    leftover = Path(plan.jobs[0].part) / "images" / "c" / "stray-chunk"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a chunk from a killed run")
    assert read_part_info(plan.jobs[0].part) is None
    outcome = ingest_source(plan.jobs[0])
    assert outcome.status == "written" and read_part_info(plan.jobs[0].part).samples == outcome.samples
    assert not leftover.exists()  # the killed run's files were cleared, not mixed with the new ones


def test_the_part_key_follows_the_files_the_options_and_the_reader_settings(tmp_path: Path, scenes,
                                                                            monkeypatch) -> None:
    import shutil

    scene = tmp_path / "scene"
    shutil.copytree(scenes["a"]["scene_dir"], scene)
    request = replace(REQUEST, source=scene)
    key = part_key("satellite", request)
    assert part_key("satellite", request) == key
    assert part_key("satellite", replace(request, tile_size=24, stride=24, block_size=24)) != key
    assert part_key("satellite", replace(request, labels=scenes["a"]["labels"])) != key
    monkeypatch.setenv("VITRAIL_DEID_SALT", "another-salt")
    assert part_key("satellite", request) != key
    monkeypatch.delenv("VITRAIL_DEID_SALT")
    band = next(scene.glob("*_B02.tif"))
    os.utime(band, ns=(band.stat().st_atime_ns, band.stat().st_mtime_ns + 10**9))  # a band rewritten in place
    assert part_key("satellite", request) != key


def test_a_source_listed_twice_is_refused(tmp_path: Path, scenes) -> None:
    source = str(scenes["a"]["scene_dir"])
    with pytest.raises(RequestError, match="listed twice"):
        plan_ingest("satellite", REQUEST, [source, source + "/"], [None, None], str(tmp_path / "ds"))


def test_one_source_is_written_straight_without_parts(tmp_path: Path, scenes) -> None:
    from tasks.dataset import build_dataset

    plan, outcomes, info = _ingest(["a"], scenes, tmp_path / "ds")
    assert plan.direct is not None and plan.jobs == () and outcomes == []
    direct = build_dataset("satellite", replace(REQUEST, source=scenes["a"]["scene_dir"],
                                                labels=scenes["a"]["labels"]), tmp_path / "direct", SplitParams(seed=1))
    assert info.digest == direct.digest and not Path(plan.parts_root).exists()


# --- the writer's several-sources mode --------------------------------------------------------------


def test_sources_that_disagree_on_channels_are_refused_naming_both(tmp_path: Path) -> None:
    other = (Channel("B08", 832.8, 10.0), *CHANNELS[1:])
    batches = [make_samples(source="scene-one"), make_samples(seed=1, channels=other, source="scene-two")]
    with pytest.raises(DatasetError, match="sources scene-one and scene-two disagree on channels"):
        write_dataset(batches, "satellite", "classification", tmp_path / "ds", SplitParams(), several_sources=True)
    assert not (tmp_path / "ds").exists()


def test_without_the_several_sources_mode_a_second_source_is_refused(tmp_path: Path) -> None:
    batches = [make_samples(source="scene-one"), make_samples(seed=1, source="scene-two")]
    with pytest.raises(DatasetError, match="disagree on source"):
        write_dataset(batches, "satellite", "classification", tmp_path / "ds", SplitParams())


def test_facts_on_which_sources_differ_are_kept_per_source(tmp_path: Path) -> None:
    one = make_samples(source="scene-one")
    two = replace(make_samples(seed=1, source="scene-two"), provenance={"crs": "EPSG:32618", "date": "2024-06-01"})
    one.provenance = {"crs": "EPSG:32618", "date": "2024-05-01"}
    info = write_dataset([one, two], "satellite", "classification", tmp_path / "ds", SplitParams(),
                         several_sources=True)
    assert info.provenance["crs"] == "EPSG:32618"
    assert json.loads(info.provenance["date"]) == {"scene-one": "2024-05-01", "scene-two": "2024-06-01"}
    assert info.sources == ("scene-one", "scene-two")


def test_radiology_patients_seen_in_two_sources_stay_one_group_and_each_source_keeps_its_audit(tmp_path: Path,
                                                                                              caplog) -> None:
    import pyarrow.parquet as pq

    from domains.radiology.examples import write_example

    first, second = write_example(tmp_path / "export-1", seed=0), write_example(tmp_path / "export-2", seed=1)
    sources = [str(first["source"]), str(second["source"])]
    plan = plan_ingest("radiology", IngestRequest(source=first["source"]), sources, [str(first["labels"])] * 2,
                       str(tmp_path / "ds"))
    outcomes = [ingest_source(job) for job in plan.jobs]
    info = assemble_dataset(plan, outcomes, SplitParams(seed=0))
    assert [o.status for o in outcomes] == ["written", "written"] and len(info.sources) == 2
    assert all(source.startswith("radiology:") for source in info.sources)  # folders may be named after patients
    manifest = pq.read_table(tmp_path / "ds" / "manifest.parquet").to_pydict()
    sources_of, splits_of = {}, {}
    for group, source, split in zip(manifest["group"], manifest["source"], manifest["split"]):
        sources_of.setdefault(group, set()).add(source)
        splits_of.setdefault(group, set()).add(split)
    # The same (pseudonymous) patients are in both exports: one group each, whole in one split.
    assert all(len(s) == 2 for s in sources_of.values()) and all(len(s) == 1 for s in splits_of.values())
    audits = sorted((tmp_path / "ds" / "sources").glob("*/deidentification_audit.json"))
    assert [a.parent.name for a in audits] == ["000", "001"]
    assert not (tmp_path / "ds" / "deidentification_audit.json").exists()
    repeated = len(manifest["sample_id"]) - len(set(manifest["sample_id"]))
    assert repeated and f"{repeated} samples repeat a sample of another source" in caplog.text


def test_a_radiology_source_left_out_is_named_by_its_pseudonym(tmp_path: Path) -> None:
    from domains.radiology.examples import write_example

    good = write_example(tmp_path / "export", seed=0)
    named = tmp_path / "DOE^JANE"  # an export folder named after the patient, that cannot be read
    sources = [str(good["source"]), str(named)]
    plan = plan_ingest("radiology", IngestRequest(source=good["source"]), sources, [str(good["labels"])] * 2,
                       str(tmp_path / "ds"))
    outcomes = [ingest_source(job) for job in plan.jobs]
    assemble_dataset(plan, outcomes, SplitParams(seed=0))
    quarantine = (tmp_path / "ds" / "quarantine.json").read_text()
    assert outcomes[1].status == "failed" and "DOE" not in quarantine and outcomes[1].source in quarantine
