"""Slide-level learning: bags of a slide's tiles as a dataset view, the attention-MIL model, its export,
training through the one loop, and what the stages after training see."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from domains import Channel, SampleSet
from tasks.bags import BAG_LABELS_KEY, BagImages, BagParams, bag_of, bag_params_of, bag_view
from tasks.model_inputs import load_dataset_for
from tasks.dataset import DatasetError, SplitParams, load_dataset, write_dataset
from tasks_support import tiny_backbone

RGB = (Channel("R"), Channel("G"), Channel("B"))
CLASSES = ("normal", "tumor")
TILE = 8


def slide_samples(slides: int = 24, tiles_per_slide: int = 12, seed: int = 0, unlabelled: int = 1) -> SampleSet:
    """Tiles of ``slides`` slides (one patient each); a tumour slide hides 3 bright-red tiles among grey ones.

    Every tile's green channel carries its slide number, so a test can tell which slide a tile came from.
    The last ``unlabelled`` slides have no slide label.
    """
    rng = np.random.default_rng(seed)
    images, ids, groups, labels = [], [], [], {}
    for s in range(slides):
        tumour = s % 2 == 1
        count = tiles_per_slide - (s % 3)  # slides differ in tile count
        tiles = np.full((count, 3, TILE, TILE), 100, dtype=np.uint8) + rng.integers(0, 20, (count, 3, TILE, TILE),
                                                                                   dtype=np.uint8)
        tiles[:, 1] = s  # the slide number, for the tests
        if tumour:
            tiles[rng.choice(count, 3, replace=False), 0] = 250
        images.append(tiles)
        ids += [f"slide-{s:02d}/{i * TILE},0" for i in range(count)]
        groups += [f"patient-{s:02d}"] * count
        if s < slides - unlabelled:
            labels[f"slide-{s:02d}"] = CLASSES[int(tumour)]
    images = np.concatenate(images)
    # Tile labels are the slide's (weak labels), -1 for unlabelled slides.
    tile_labels = np.array([CLASSES.index(labels[bag_of(i)]) if bag_of(i) in labels else -1 for i in ids])
    return SampleSet(images=images, labels=tile_labels, groups=np.array(groups),
                     locations=np.zeros((len(images), 2), dtype=np.int64), source="slides", channels=RGB,
                     class_names=CLASSES, sample_ids=np.array(ids), scaling=((1 / 255, 0.0),) * 3,
                     provenance={BAG_LABELS_KEY: json.dumps(labels)})


@pytest.fixture(scope="module")
def slide_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("slides") / "dataset"
    write_dataset(slide_samples(), "histopathology", "classification", out, SplitParams(seed=1))
    return out


def _slide_numbers(bag: np.ndarray) -> set[int]:
    return set(np.round(bag[:, 1, 0, 0] * 255).astype(int).tolist())


def test_bags_hold_one_slides_tiles_each_and_keep_the_patient_split(slide_dataset: Path) -> None:
    params = BagParams(enabled=True, bag_size=5, bags_per_slide=3, eval_bag_size=16)
    tiles = load_dataset(slide_dataset)
    bags = bag_view(tiles, params)
    train_slides = {bag_of(i) for i in tiles.splits["train"].sample_ids}
    assert len(bags.splits["train"]) == 3 * len(train_slides)
    assert bags.splits["train"].images.shape[1:] == (5, 3, TILE, TILE)
    for split, view in bags.splits.items():
        patients = set(tiles.splits[split].groups.tolist())
        assert set(view.groups.tolist()) <= patients  # a bag stays in its slide's split
        for index in range(len(view)):
            assert len(_slide_numbers(view.images[index])) == 1
    # The three draws of one training slide are different samples of its tiles.
    first = [bags.splits["train"].images.members[i] for i in range(3)]
    assert not (np.array_equal(first[0], first[1]) and np.array_equal(first[1], first[2]))
    # An evaluation bag is the slide's tiles cycled to the bag size (the slides have 10 to 12 tiles).
    test = bags.splits["test"]
    assert test.images.shape[1] == 16
    members = test.images.members[0]
    assert len(set(members.tolist())) >= 10
    # Labels are the slides' classes: tumour slides have odd numbers.
    for index in range(len(test)):
        slide = _slide_numbers(test.images[index]).pop()
        assert test.labels[index] == slide % 2


def test_unlabelled_slides_are_left_out_and_draws_are_reproducible(slide_dataset: Path) -> None:
    params = BagParams(enabled=True, bag_size=4, bags_per_slide=2)
    one, two = (bag_view(load_dataset(slide_dataset), params) for _ in range(2))
    for split in one.splits:
        assert all(np.array_equal(a, b) for a, b in zip(one.splits[split].images.members,
                                                         two.splits[split].images.members))
        numbers = set().union(*(_slide_numbers(one.splits[split].images[i]) for i in range(len(one.splits[split]))))
        assert 23 not in numbers  # the unlabelled slide
    reseeded = bag_view(load_dataset(slide_dataset), params.model_copy(update={"seed": 5}))
    assert not all(np.array_equal(a, b) for a, b in zip(one.splits["train"].images.members,
                                                         reseeded.splits["train"].images.members))


def test_a_dataset_without_slide_labels_is_refused_with_the_reason(tmp_path: Path) -> None:
    samples = slide_samples()
    samples.provenance = {}
    write_dataset(samples, "histopathology", "classification", tmp_path / "d", SplitParams(seed=1))
    with pytest.raises(DatasetError, match="no slide \\(bag\\) labels"):
        load_dataset_for(tmp_path / "d", bags=BagParams(enabled=True))
    samples.provenance = {BAG_LABELS_KEY: json.dumps({"slide-00": "cancer"})}
    write_dataset(samples, "histopathology", "classification", tmp_path / "e", SplitParams(seed=1))
    with pytest.raises(DatasetError, match="not among the dataset's classes"):
        load_dataset_for(tmp_path / "e", bags=BagParams(enabled=True))


def test_bag_images_index_like_an_array() -> None:
    tiles = np.arange(10 * 3 * 2 * 2, dtype=np.float32).reshape(10, 3, 2, 2)
    bags = BagImages(tiles, [np.array([0, 1]), np.array([2, 9]), np.array([5, 5])])
    assert bags.shape == (3, 2, 3, 2, 2) and len(bags) == 3
    assert np.array_equal(bags[1], tiles[[2, 9]])
    assert np.array_equal(bags[1:], np.stack([tiles[[2, 9]], tiles[[5, 5]]]))
    assert np.array_equal(bags[np.array([2, 0])], np.stack([tiles[[5, 5]], tiles[[0, 1]]]))
    assert np.array_equal(np.asarray(bags)[-1], bags[-1])
    with pytest.raises(IndexError):
        bags[3]


def _mil_model(num_classes: int = 2):
    from tasks.models import NormalizedClassifier, build_backbone

    torch.manual_seed(0)
    net = build_backbone(tiny_backbone(), RGB, num_classes, TILE, bags=BagParams(enabled=True, attention_dim=16))
    return NormalizedClassifier(net, (0.5,) * 3, (0.2,) * 3).eval()


def test_attention_mil_pools_any_number_of_tiles_and_ignores_their_order() -> None:
    from tasks.models import BagOutputs

    model = _mil_model()
    bag = torch.rand(2, 7, 3, TILE, TILE)
    with torch.inference_mode():
        logits, attention = BagOutputs(model)(bag)
        shuffled = model(bag[:, torch.randperm(7)])
        fewer = model(bag[:, :3])
    assert logits.shape == (2, 2) and attention.shape == (2, 7)
    assert torch.allclose(attention.sum(dim=1), torch.ones(2), atol=1e-6)
    assert torch.allclose(shuffled, logits, atol=1e-5)
    assert fewer.shape == (2, 2)
    assert bag_params_of(model).enabled


def test_slide_model_exports_with_any_bag_size_and_attention_output(tmp_path: Path) -> None:
    from tasks.compression.export import check_parity, export_onnx
    from tasks.models import BagOutputs
    from tasks.onnx_runtime import open_session, session_bag_predictor

    model = _mil_model()
    bags = np.random.default_rng(0).random((3, 6, 3, TILE, TILE), dtype=np.float32)
    path = export_onnx(model, bags, tmp_path / "slide.onnx", {"bags": {"enabled": True}})
    report = check_parity(model, path, bags, tolerance=1e-4)
    assert report.passed, report
    # A bag of another size than the one traced, through the bag predictor with the attention output.
    tiles = np.random.default_rng(1).random((11, 3, TILE, TILE), dtype=np.float32)
    logits, attention = session_bag_predictor(open_session(path))(tiles)
    with torch.inference_mode():
        expected_logits, expected_attention = BagOutputs(model)(torch.from_numpy(tiles[None]))
    assert np.allclose(logits, expected_logits[0].numpy(), atol=1e-4)
    assert np.allclose(attention, expected_attention[0].numpy(), atol=1e-5)
    assert attention.shape == (11,)


def test_slide_model_round_trips_through_its_reference_files(tmp_path: Path) -> None:
    from tasks.models import load_reference_files, reference_architecture, save_reference_model

    model = _mil_model()
    architecture = reference_architecture(model, RGB, "classification")
    assert architecture.bags is not None and architecture.bags.attention_dim == 16
    weights, description = save_reference_model(model, architecture, tmp_path)
    loaded = load_reference_files(weights, description)
    bag = torch.rand(1, 5, 3, TILE, TILE)
    with torch.inference_mode():
        assert torch.equal(loaded(bag), model(bag))
    assert bag_params_of(loaded).attention_dim == 16


def test_slide_labels_are_learned_from_bags_through_the_one_training_loop(slide_dataset: Path, tmp_path: Path) -> None:
    from tasks.finetune import fit_adapter
    from tasks.models import LoraParams
    from tasks.training import TrainParams
    from tasks.validation import validate_variants

    bags = BagParams(enabled=True, bag_size=8, bags_per_slide=4, eval_bag_size=12, attention_dim=16)
    train = TrainParams(epochs=6, batch_size=4, learning_rate=3e-3, warmup_epochs=0.0, threads=1)
    outcome = fit_adapter(slide_dataset, tiny_backbone(), LoraParams(), train, tmp_path / "ckpt", bags=bags)
    assert outcome.metadata["bags"]["bag_size"] == 8
    # Three red tiles among ten grey ones decide a slide: the validation slides are told apart.
    assert outcome.fit.best_metrics["val_accuracy"] == 1.0
    result = validate_variants(slide_dataset, outcome.model, {}, tmp_path / "plots", threads=1)
    assert result.task == "slide-classification"
    report = result.reports["torch-fp32"]
    assert report.samples == len(load_dataset_for(slide_dataset, outcome.model).splits["test"])
    assert report.macro_auroc == 1.0
    assert "torch-fp32.test_group_macro_auroc" in result.flat_metrics()


def test_per_patient_scores_combine_a_patients_slides_tumour_first() -> None:
    from tasks.validation import score_per_patient

    # Patient a: a normal slide and a tumour slide the model finds; b: one normal slide; c: one tumour slide
    # the model misses. Logits are (normal, tumour).
    labels = np.array([0, 1, 0, 1])
    logits = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]]))
    report = score_per_patient(labels, logits, np.array(["a", "a", "b", "c"]), CLASSES)
    assert report.samples == 3  # patients, not slides
    # a is tumour (its worst slide) and predicted so; b normal, right; c tumour, missed.
    assert report.accuracy == pytest.approx(2 / 3)
    # Tumour probabilities per patient 0.8 (a), 0.3 (b), 0.4 (c): both tumour patients above the normal one,
    # and the normal probabilities their complements, so both classes' AUROCs are 1.
    assert report.macro_auroc == pytest.approx(1.0)
    # Three classes: P(>= k) per patient is the highest of its slides', the probabilities their differences.
    three = np.log(np.array([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.8, 0.1, 0.1]]))
    report = score_per_patient(np.array([2, 1, 0]), three, np.array(["a", "a", "b"]), ("x", "y", "z"))
    assert report.samples == 2 and report.accuracy == pytest.approx(0.5)  # a: slides called x, y -> y; is z
