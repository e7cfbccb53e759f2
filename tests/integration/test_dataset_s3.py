"""Datasets on object storage: ingest to s3://, read lazily, verify, and read from another process.

The S3 API is moto's server mode on 127.0.0.1 (a real HTTP S3 endpoint, in memory), started and
stopped by the fixture; clients find it through the standard ``AWS_*`` environment variables only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from integration_support import REPO_ROOT, running_s3_server

pytestmark = pytest.mark.integration

BUCKET = "vitrail-data"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with the bucket, this process's AWS settings pointed at it."""
    with running_s3_server(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def ingested(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    from domains.satellite.examples import write_example
    from domains.spec import IngestRequest
    from tasks.dataset import SplitParams, build_dataset

    example = write_example(tmp_path_factory.mktemp("example"), seed=0)
    url = f"s3://{BUCKET}/datasets/satellite-example"
    request = IngestRequest(source=example["scene_dir"], labels=example["labels"], tile_size=12, stride=12,
                            block_size=12, batch_samples=5)
    return url, build_dataset("satellite", request, url, SplitParams(seed=1))


def test_an_ingest_to_s3_reads_back_lazily_and_verifies(ingested) -> None:
    import s3fs

    from tasks.dataset import load_dataset, verify_dataset

    url, info = ingested
    keys = s3fs.S3FileSystem().find(url)
    assert {f"{url[5:]}/{name}" for name in ("dataset.json", "manifest.parquet", "zarr.json")} <= set(keys)
    assert not any(key.endswith(".vitrail-writing") for key in keys)  # the write finished
    loaded = load_dataset(url)
    assert loaded.info == info and loaded.path == url
    train = loaded.splits["train"]
    assert train.images.shape[1:] == (13, 12, 12) and 0.0 < float(train.images[:].max()) < 1.0
    report = verify_dataset(url)
    # Every chunk of every array: the 10 m bands, the 20 m and 60 m patches and their masks.
    assert {"images", "coarse-2", "coarse-6", "valid"} <= set(info.chunks)
    assert report.samples == sum(info.split_counts.values())
    assert report.chunks == sum(len(digests) for digests in info.chunks.values())


_READER = """
import json, sys
import numpy as np
from tasks.dataset import load_dataset
dataset = load_dataset(sys.argv[1])
test = dataset.splits["test"]
print(json.dumps({"digest": dataset.info.digest, "n": len(test), "sum": float(np.asarray(test.images[:], np.float64).sum())}))
"""


def test_a_second_process_reads_the_same_dataset_from_s3(ingested) -> None:
    from tasks.dataset import load_dataset

    url, info = ingested
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # AWS_* settings travel through the environment only
    out = subprocess.run([sys.executable, "-c", _READER, url], check=False, capture_output=True, text=True, env=env,
                         timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    here = load_dataset(url).splits["test"]
    assert seen == {"digest": info.digest, "n": len(here), "sum": float(np.asarray(here.images[:], np.float64).sum())}


def make_samples():
    from domains import Channel, SampleSet

    rng = np.random.default_rng(0)
    n = 48
    return SampleSet(images=rng.integers(0, 3000, (n, 2, 8, 8), dtype=np.uint16), labels=np.arange(n) % 2,
                     groups=np.array([f"g{i // 4}" for i in range(n)]),
                     locations=np.stack([np.arange(n), np.zeros(n, int)], axis=1), source="scene",
                     channels=(Channel("B04"), Channel("B08")), class_names=("a", "b"), scaling=((1e-4, 0.0),) * 2)


def test_a_damaged_chunk_on_s3_is_named_and_a_prefix_without_metadata_is_not_a_dataset(ingested) -> None:
    import s3fs

    from tasks.dataset import (
        DatasetError,
        SplitParams,
        load_dataset,
        read_dataset_info,
        verify_dataset,
        write_dataset,
    )

    fs = s3fs.S3FileSystem()
    url = f"s3://{BUCKET}/datasets/damaged"
    write_dataset(make_samples(), "satellite", "classification", url, SplitParams())
    chunk = f"{url[5:]}/images/c/0/0/0/0"
    raw = bytearray(fs.cat_file(chunk))
    raw[len(raw) // 2] ^= 0xFF
    fs.pipe_file(chunk, bytes(raw))
    with pytest.raises(DatasetError, match="images/c/0/0/0/0"):
        verify_dataset(url)
    with pytest.raises(DatasetError, match="images/c/0/0/0/0"):
        load_dataset(url).splits["train"].images[0]

    fs.rm(f"{url[5:]}/dataset.json")  # what a writer killed before its last step leaves
    with pytest.raises(DatasetError, match="no dataset.json"):
        read_dataset_info(url)
    fs.pipe_file(f"{BUCKET}/datasets/notes/keep.txt", b"mine")
    with pytest.raises(DatasetError, match="not a Vitrail dataset"):
        write_dataset(make_samples(), "satellite", "classification", f"s3://{BUCKET}/datasets/notes", SplitParams())
    assert fs.cat_file(f"{BUCKET}/datasets/notes/keep.txt") == b"mine"


def test_vitrail_dataset_verify_checks_an_s3_dataset(ingested, capsys) -> None:
    from flows.cli import main

    url, info = ingested
    assert main(["dataset", "verify", url]) == 0
    assert capsys.readouterr().out.startswith(f"{url}: ok, {sum(info.split_counts.values())} samples")
