"""Contract tests over the domain registry: every domain, present or future, must pass them."""

import subprocess
import sys

import numpy as np
import pytest

from domains import (LABEL_RANKS, DomainSpec, IngestRequest, PredictionRequest, SampleSet, domain_names, get_domain,
                     labelled_samples, registry)

DOMAINS = domain_names()


def test_registry_discovers_domain_folders():
    assert "satellite" in DOMAINS
    assert all(isinstance(spec, DomainSpec) for spec in registry().values())


def test_unknown_domain_lists_known_ones():
    with pytest.raises(KeyError, match="known domains: .*satellite"):
        get_domain("astronomy")


def test_importing_the_registry_stays_light():
    code = ("import sys, domains; domains.registry(); "
            "heavy = [m for m in ('torch', 'rasterio', 'prefect', 'mlflow', 'timm') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


@pytest.mark.parametrize("name", DOMAINS)
def test_spec_is_complete(name):
    spec = get_domain(name)
    assert spec.name == name and spec.title and spec.intended_use
    assert spec.task in ("classification", "multilabel", "segmentation")
    assert len(spec.default_class_names) >= 2 and spec.default_channels
    assert spec.default_tile_size >= 8 and spec.default_peft_targets


@pytest.mark.parametrize("name", DOMAINS)
def test_example_reads_into_a_valid_labelled_sample_set(name, tmp_path):
    spec = get_domain(name)
    example = spec.write_example(tmp_path)
    read = spec.read_samples(IngestRequest(source=example["source"], labels=example.get("labels"),
                                           tile_size=8, stride=8, block_size=16))
    # A reader returns one SampleSet or streams bounded batches (possibly in the source dtype).
    batches = [read] if isinstance(read, SampleSet) else list(read)
    samples = batches[0]
    images = np.concatenate([b.physical() for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    groups = np.concatenate([np.asarray(b.groups) for b in batches])
    assert images.shape[1] == len(samples.channels)
    assert np.isfinite(images).all()
    assert labelled_samples(labels).all() and labels.max() < len(samples.class_names)
    assert labels.ndim == LABEL_RANKS[samples.task or spec.task]
    assert len(set(groups.tolist())) >= 3


@pytest.mark.parametrize("name", DOMAINS)
def test_prediction_writes_one_output_per_input(name, tmp_path):
    spec = get_domain(name)
    example = spec.write_example(tmp_path)
    inputs = spec.list_prediction_inputs(example["source"])
    assert inputs
    k = len(spec.default_class_names)

    def infer(batch: np.ndarray) -> np.ndarray:
        # Every sample (or pixel) is the first class with certainty.
        first = np.eye(k, dtype=np.float32)[np.zeros(len(batch), dtype=int)]
        if spec.task == "segmentation":
            return np.broadcast_to(first[:, :, None, None], (len(batch), k, *batch.shape[2:])).copy()
        return first

    output = tmp_path / f"out{spec.prediction_suffix}"
    summary = spec.predict(PredictionRequest(
        input=inputs[0], output=output, channels=spec.default_channels, class_names=spec.default_class_names,
        tile_size=8, stride=8, infer=infer, task=spec.task))
    assert output.is_file()
    assert summary.samples > 0 and summary.class_counts[spec.default_class_names[0]] > 0
