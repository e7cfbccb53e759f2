"""A many-source ingest whose dataset and checkpoints live on object storage (moto's S3 server on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from integration_support import running_s3_server

pytestmark = pytest.mark.integration

BUCKET = "vitrail-parts"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with the bucket, this process's AWS settings pointed at it."""
    with running_s3_server(BUCKET) as endpoint:
        yield endpoint


def test_parts_on_s3_resume_and_combine_into_one_dataset(s3_endpoint: str, tmp_path) -> None:
    import s3fs

    from domains import IngestRequest
    from domains.satellite.examples import write_example
    from tasks.dataset import SplitParams, load_dataset, verify_dataset
    from tasks.ingest_sources import assemble_dataset, ingest_source, plan_ingest

    scenes = [write_example(tmp_path / name, seed=seed) for seed, name in enumerate(("one", "two"))]
    url = f"s3://{BUCKET}/datasets/two-scenes"
    request = IngestRequest(source=scenes[0]["scene_dir"], tile_size=12, stride=12, block_size=12)
    sources, labels = [str(s["scene_dir"]) for s in scenes], [str(s["labels"]) for s in scenes]

    plan = plan_ingest("satellite", request, sources, labels, url)
    assert plan.parts_root == f"s3://{BUCKET}/datasets/.two-scenes.parts"
    first = ingest_source(plan.jobs[0])  # as if the run died before the second source
    fs = s3fs.S3FileSystem()
    assert fs.exists(f"{plan.jobs[0].part}/part.json") and not fs.exists(plan.jobs[1].part)

    rerun = plan_ingest("satellite", request, sources, labels, url)
    assert rerun.resumed == 1
    outcomes = [ingest_source(job) for job in rerun.jobs]
    assert [o.status for o in outcomes] == ["resumed", "written"] and outcomes[0].samples == first.samples
    info = assemble_dataset(rerun, outcomes, SplitParams(seed=1))
    assert info.sources == tuple(sources)
    assert verify_dataset(url).samples == sum(o.samples for o in outcomes)
    assert load_dataset(url).info.digest == info.digest
    assert not fs.exists(plan.parts_root) or not fs.find(plan.parts_root)  # parts removed once combined
