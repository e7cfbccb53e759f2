"""Input normalisation as part of a model: fitted on the training tiles, applied by every stage, saved with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domains import IngestRequest, convert_units, get_domain
from domains.histopathology.demo import write_demo_cohort
from tasks.dataset import SplitParams, build_dataset, load_dataset
from tasks.model_inputs import apply_normalisation, fit_normalisation, load_dataset_for, normalisation_of
from tasks.request_errors import RequestError
from tasks_support import tiny_backbone


@pytest.fixture(scope="module")
def slide_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiles of a small synthetic cohort cut from the real H&E demo slide."""
    folder = tmp_path_factory.mktemp("cohort")
    slides, manifest = write_demo_cohort(folder / "cohort", patients=6)
    out = folder / "dataset"
    build_dataset("histopathology", IngestRequest(source=slides, labels=manifest, tile_size=32, stride=32), out,
                  SplitParams())
    return out


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stain_normalisation_is_fitted_on_training_tiles_and_applied_on_read(slide_tiles: Path, method: str) -> None:
    dataset = load_dataset(slide_tiles)
    fitted = fit_normalisation(dataset, method)
    assert fitted["method"] == method and fitted["tiles"] > 0
    assert 0.0 <= fitted["fallback_share_on_fit_tiles"] < 0.5
    view = load_dataset_for(slide_tiles, normalisation=fitted)
    # A model takes the stored 8-bit values; the normalisation works on physical [0, 1] and comes back in them.
    scaling = dataset.info.scaling
    raw, seen = load_dataset_for(slide_tiles).splits["test"].images[:8], view.splits["test"].images[:8]
    assert np.array_equal(raw, np.rint(dataset.splits["test"].images[:8] * 255)) and raw.max() > 1
    assert seen.shape == raw.shape and seen.dtype == np.float32
    assert not np.allclose(seen, raw, atol=2)  # the colours moved towards the reference
    assert np.array_equal(seen, apply_normalisation("histopathology", fitted, raw, scaling))
    np.testing.assert_allclose(convert_units(seen, scaling, None),
                               apply_normalisation("histopathology", fitted, dataset.splits["test"].images[:8]),
                               atol=1e-5)
    assert np.array_equal(view.splits["test"].images[3], seen[3])  # one sample reads like a batch row


def test_glass_tiles_come_back_unchanged() -> None:
    domain = get_domain("histopathology")
    rng = np.random.default_rng(0)
    tissue = np.stack([np.full((32, 32), v) for v in (0.55, 0.35, 0.6)])[None] + rng.normal(0, 0.08, (40, 3, 32, 32))
    fitted = domain.fit_input_normalisation("macenko", np.clip(tissue, 0, 1).astype(np.float32))
    glass = np.full((2, 3, 32, 32), 0.95, dtype=np.float32)
    assert np.allclose(apply_normalisation("histopathology", fitted, glass), glass, atol=0.5 / 255)


def test_a_domain_without_such_a_normalisation_refuses_it(tmp_path: Path, dataset) -> None:
    with pytest.raises(RequestError, match="not offered for satellite"):
        fit_normalisation(dataset, "macenko")


def test_the_fitted_normalisation_travels_with_the_model(slide_tiles: Path, tmp_path: Path) -> None:
    from domains import Channel
    from tasks.finetune import fit_adapter
    from tasks.models import LoraParams, load_reference_files, reference_architecture, save_reference_model
    from tasks.training import TrainParams

    train = TrainParams(epochs=1, batch_size=32, warmup_epochs=0.0, threads=1)
    outcome = fit_adapter(slide_tiles, tiny_backbone(), LoraParams(), train, tmp_path / "ckpt",
                          input_normalisation="reinhard")
    fitted = normalisation_of(outcome.model)
    assert fitted["method"] == "reinhard" and outcome.metadata["input_normalisation"] == fitted
    channels = tuple(Channel(**c) for c in outcome.metadata["channels"])
    weights, description = save_reference_model(outcome.model, reference_architecture(outcome.model, channels,
                                                                                      "classification"), tmp_path)
    loaded = load_reference_files(weights, description)
    assert normalisation_of(loaded) == fitted
    # The stages after training open the dataset as the model saw it.
    seen = load_dataset_for(slide_tiles, loaded).splits["test"].images[:4]
    raw = load_dataset_for(slide_tiles).splits["test"].images[:4]  # the stored 8-bit values the model takes
    assert loaded.input_scaling == load_dataset(slide_tiles).info.scaling
    assert np.array_equal(seen, apply_normalisation("histopathology", fitted, raw, loaded.input_scaling))
