"""The catalog beyond pathology: entries over the four domains with ordered bands and preprocessing, offline
loading of synthetic checkpoints under each entry's real file name and key layout, the published sha256,
the licence gate, band-order checks, and patch-embedding adaptation by band name."""

from __future__ import annotations

import dataclasses
import hashlib
import pytest
import torch

from domains import Channel
from tasks.backbone_catalog import (ACCEPT_LICENCES_ENV, CATALOG, RGB_BANDS, SENTINEL2_L1C_BANDS, WEIGHTS_DIR_ENV,
                                    BandMismatchError, ChecksumMismatchError, CheckpointMismatchError,
                                    LicenceNotAcceptedError, UnsupportedBuilderError, adapt_patch_embedding_by_name,
                                    band_adaptation_of, create_catalog_model, from_timm_layout, get_entry, match_band)
from tasks.models import BackboneParams, build_backbone

# Sentinel-2 as the satellite domain names its bands (domains/satellite/sensors.py): B01..B12 with B8A.
S2 = SENTINEL2_L1C_BANDS
MOCO = "ssl4eo-s12-vit-s16-moco"


def test_the_catalog_covers_four_domains_with_ordered_bands_preprocessing_and_provenance():
    assert len(CATALOG) >= 14
    assert {d for e in CATALOG.values() for d in e.domains} == {"histopathology", "satellite", "radiology",
                                                                "hyperspectral"}
    for entry in CATALOG.values():
        assert entry.hub_id and entry.weights_file and entry.licence and entry.source, entry.name
        assert len(entry.mean) == len(entry.std) == len(entry.bands), entry.name  # one statistic per band, in order
        assert all(s > 0 for s in entry.std) and (entry.scale is None or entry.scale > 0), entry.name
        assert entry.builder == "timm" or entry.builder_call, entry.name  # how users really build it
    moco = get_entry(MOCO)
    assert [b.name for b in moco.bands] == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09",
                                            "B10", "B11", "B12"]
    assert moco.scale == 1e-4 and moco.bands[8].wavelength_nm == 864.7 and moco.bands[0].resolution_m == 60.0
    assert len(moco.sha256) == 64 and moco.revision  # the LFS digest and torchgeo's pinned revision
    assert get_entry("softcon-vit-s14").mean[10] == 22.0  # B10 (cirrus) mean in DN: per-band, not RGB
    prithvi = get_entry("prithvi-eo-2.0-300m")
    assert [b.name for b in prithvi.bands] == ["blue", "green", "red", "nir_narrow", "swir_1", "swir_2"]
    assert prithvi.mean[3] == 2734.0 and prithvi.std[5] == 1049.0
    assert get_entry("rad-dino").grey_as_rgb and not get_entry("dinov2-vit-b14").grey_as_rgb
    assert get_entry("uni").needs_acceptance and not get_entry("dinov2-vit-s14").needs_acceptance


@pytest.mark.parametrize("name", [n for n, e in CATALOG.items() if e.builder != "timm"])
def test_entries_that_are_not_timm_vits_are_refused_naming_their_builder(name):
    entry = CATALOG[name]
    with pytest.raises(UnsupportedBuilderError, match=f"{name} is not a plain timm ViT .*built with") as error:
        build_backbone(BackboneParams(name=name), entry.bands or RGB_BANDS, num_classes=2, img_size=224)
    if entry.builder != "hypersigma":
        assert f"pip install {entry.builder}" in str(error.value) or "installed here" in str(error.value)


def _moco_file(weights_dir, state=None):
    """An SSL4EO-S12 MoCo checkpoint as torchgeo publishes it: a plain timm state dict (13-band patch embedding,
    no head) under the published file name. One block only: the layout is what is tested."""
    torch.manual_seed(0)
    if state is None:
        state = {k: v for k, v in create_catalog_model(get_entry(MOCO), depth=1).state_dict().items()
                 if not k.startswith("head.")}
    path = weights_dir / MOCO / get_entry(MOCO).weights_file
    path.parent.mkdir(exist_ok=True)
    torch.save(state, path)
    return state, path


def _trust_synthetic_file(monkeypatch, name, path):
    """The published digest belongs to the real file: point the entry at the synthetic file's digest instead."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(CATALOG, name, dataclasses.replace(CATALOG[name], sha256=digest))


def test_ssl4eo_checkpoint_loads_offline_and_its_sha256_is_checked(weights_dir, offline, monkeypatch):
    state, path = _moco_file(weights_dir)
    params = BackboneParams(name=MOCO, weights="hub", depth=1)
    with pytest.raises(ChecksumMismatchError, match=f"{path.name}: sha256 .* is not the published 67c9032df044"):
        build_backbone(params, S2, num_classes=3, img_size=224)
    _trust_synthetic_file(monkeypatch, MOCO, path)
    model = build_backbone(params, S2, num_classes=3, img_size=224)
    loaded = model.state_dict()
    assert torch.equal(loaded["patch_embed.proj.weight"], state["patch_embed.proj.weight"])  # 13 bands as stored
    assert torch.equal(loaded["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert band_adaptation_of(model)["adapted"] is False
    assert model(torch.rand(1, 13, 224, 224)).shape == (1, 3)
    # A tensor the architecture has no slot for is refused, named as in the file.
    _moco_file(weights_dir, {**state, "blocks.0.attn.rel_pos": torch.zeros(4)})
    _trust_synthetic_file(monkeypatch, MOCO, path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected tensors 1 \(blocks.0.attn.rel_pos\)"):
        build_backbone(params, S2, num_classes=3, img_size=224)


def test_sentinel2_bands_in_another_order_are_refused_or_permuted_by_name(weights_dir, offline, monkeypatch):
    state, path = _moco_file(weights_dir)
    _trust_synthetic_file(monkeypatch, MOCO, path)
    reordered = tuple(reversed(S2))
    with pytest.raises(BandMismatchError, match=r"trained on the bands B01, B02, .* in this order; the data has "
                                                r"B12, B11, .*\(the same bands in another order\)"):
        build_backbone(BackboneParams(name=MOCO, weights="hub", depth=1), reordered, 2, 224)
    model = build_backbone(BackboneParams(name=MOCO, weights="hub", depth=1, adapt_bands=True), reordered, 2, 224)
    kernels, stored = model.patch_embed.proj.weight, state["patch_embed.proj.weight"]
    assert all(torch.equal(kernels[:, j], stored[:, 12 - j]) for j in range(13))
    record = band_adaptation_of(model)
    assert record["adapted"] and record["new"] == [] and record["copied"][0] == ["B12", "B12", "name"]


def _rad_dino_file(weights_dir):
    """RAD-DINO as transformers writes it (Dinov2Model names, separate q/k/v, a mask token), one block."""
    torch.manual_seed(2)
    source = create_catalog_model(get_entry("rad-dino"), depth=1)
    state = from_timm_layout(source.state_dict(), "hf-dinov2")
    state = {k: v.contiguous() for k, v in state.items() if not k.startswith("head.")}
    state["embeddings.mask_token"] = torch.zeros(1, 768)
    path = weights_dir / "rad-dino" / "model.safetensors"
    path.parent.mkdir()
    from safetensors.torch import save_file

    save_file(state, str(path))
    return source


def test_rad_dino_needs_its_licence_accepted_and_takes_a_grey_radiograph_as_the_card_does(weights_dir, offline,
                                                                                           monkeypatch):
    source = _rad_dino_file(weights_dir)
    grey = (Channel("image"),)
    with pytest.raises(LicenceNotAcceptedError, match="rad-dino weights are under MIT, card: research use only "
                                                      r"\(not for commercial use\).*VITRAIL_ACCEPT_LICENCES=rad-dino"):
        build_backbone(BackboneParams(name="rad-dino", weights="hub", depth=1), grey, 2, 56)
    monkeypatch.setenv(ACCEPT_LICENCES_ENV, "uni, rad-dino")
    adapted = build_backbone(BackboneParams(name="rad-dino", weights="hub", depth=1), grey, 2, 56).eval()
    as_rgb = build_backbone(BackboneParams(name="rad-dino", weights="hub", depth=1), RGB_BANDS, 2, 56).eval()
    record = band_adaptation_of(adapted)
    assert record["adapted"] and record["new"] == ["image"] and "as the model card does" in record["initialisation"]
    kernel = source.state_dict()["patch_embed.proj.weight"]
    assert torch.allclose(adapted.patch_embed.proj.weight[:, 0], kernel.sum(dim=1))
    # The grey model is exactly the published RGB model on the plane replicated in R, G and B.
    adapted.head.load_state_dict(as_rgb.head.state_dict())
    x = torch.rand(2, 1, 56, 56)
    assert torch.allclose(adapted.forward_features(x), as_rgb.forward_features(x.expand(-1, 3, -1, -1)), atol=1e-5)
    # DINOv2 has no such card statement: a grey plane is refused, not silently tiled.
    with pytest.raises(BandMismatchError, match="dinov2-vit-s14 was trained on the bands red, green, blue"):
        build_backbone(BackboneParams(name="dinov2-vit-s14", weights="hub", depth=1), grey, 2, 56)


def test_an_adapted_model_is_described_and_rebuilt_with_the_data_bands(weights_dir, offline, monkeypatch):
    from tasks.models import NormalizedClassifier, build_reference_model, reference_architecture

    _rad_dino_file(weights_dir)
    grey = (Channel("image"),)
    net = build_backbone(BackboneParams(name="rad-dino", weights="hub", depth=1, accept_licence=True), grey, 2, 56)
    model = NormalizedClassifier(net, (0.5307,), (0.2583,))
    architecture = reference_architecture(model, grey, "classification")
    assert architecture.backbone == "rad-dino"
    assert build_reference_model(architecture).net.patch_embed.proj.weight.shape == (768, 1, 14, 14)


def test_adaptation_copies_shared_bands_by_name_and_initialises_new_ones_as_documented():
    torch.manual_seed(3)
    weight = torch.randn(8, 13, 2, 2)
    data = (Channel("B4"), Channel("b03"), Channel("B02", 492.7), Channel("B8A"), Channel("ndvi"))
    kernels, record = adapt_patch_embedding_by_name(weight, S2, data)
    assert record.adapted and record.new == ("ndvi",)
    assert [c[:2] for c in record.copied] == [("B4", "B04"), ("b03", "B03"), ("B02", "B02"), ("B8A", "B8A")]
    for j, i in enumerate((3, 2, 1, 8)):
        assert torch.equal(kernels[:, j], weight[:, i])
    lacking = [i for i in range(13) if i not in (3, 2, 1, 8)]
    assert record.dropped == tuple(S2[i].name for i in lacking)
    assert torch.allclose(kernels[:, 4], weight[:, lacking].sum(dim=1))
    # A spectrally flat input embeds as in pretraining: the kernels sum to the same.
    assert torch.allclose(kernels.sum(dim=1), weight.sum(dim=1), atol=1e-5)
    # Unchanged when the data has the entry's bands in its order.
    same, record = adapt_patch_embedding_by_name(weight, S2, S2)
    assert same is weight and not record.adapted


def test_narrow_hyperspectral_bands_share_the_broad_kernel_they_fall_in_and_rgb_is_never_tiled():
    weight = torch.randn(4, 3, 2, 2)
    cube = tuple(Channel(f"{w:.0f}nm", w) for w in (460.0, 470.0, 550.0, 640.0, 650.0, 900.0, 1600.0))
    kernels, record = adapt_patch_embedding_by_name(weight, RGB_BANDS, cube)
    assert torch.allclose(kernels[:, 0], weight[:, 2] / 2) and torch.allclose(kernels[:, 1], weight[:, 2] / 2)
    assert torch.allclose(kernels[:, 2], weight[:, 1]) and torch.allclose(kernels[:, 3], weight[:, 0] / 2)
    # Infrared and SWIR have no RGB kernel and nothing is lacking: zero, not a copy of red, green or blue.
    assert record.new == ("900nm", "1600nm") and not kernels[:, 5:].any()
    assert [c[2] for c in record.copied] == ["wavelength"] * 5


def test_band_names_are_matched_within_a_sensor_only():
    # Landsat-8 B5 (865 nm) is not Sentinel-2 B05 (704 nm): the name agrees, the wavelength does not.
    assert match_band(Channel("B5", 864.7), S2) == (8, "wavelength")
    assert match_band(Channel("B5"), S2) == (4, "name")
    assert match_band(Channel("R"), RGB_BANDS) == (0, "name")
    assert match_band(Channel("B05", 704.1), RGB_BANDS) == (None, "")  # red edge is 39 nm from red: no match
