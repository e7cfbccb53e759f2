"""Hyperspectral domain: methane plume segmentation in imaging-spectrometer captures (EMIT, AVIRIS-NG, PRISMA, EnMAP).

Readers (ENVI, multi-band GeoTIFF), wavelength-aware band selection, the CH4 unit absorption spectrum and
classical detectors (matched filter, ACE, Mag1c-SAS), Beer-Lambert plume injection for synthetic training
data, and sliding-window prediction writing a mask raster and a plume list. Every module imports its
heavy dependencies (rasterio, scipy) inside functions, so the registry stays light.
"""

from __future__ import annotations

from domains.hyperspectral.demo import DEMO_NOTES, prepare_demo
from domains.hyperspectral.cascade import screening_channel
from domains.hyperspectral.examples import write_example
from domains.hyperspectral.prediction import list_prediction_inputs, predict_capture
from domains.hyperspectral.tiling import DEFAULT_CLASS_NAMES, read_samples
from domains.spec import Channel, DomainSpec

SPEC = DomainSpec(
    name="hyperspectral",
    title="Hyperspectral (EMIT, AVIRIS-NG, PRISMA/EnMAP class): methane plume segmentation",
    intended_use=(
        "Flagging candidate methane plumes in calibrated at-sensor radiance from imaging spectrometers, on the "
        "ground or on board, for triage by an analyst. Not a quantification of emission rates, not validated on real "
        "captures when trained on the synthetic demo data, and not for regulatory or enforcement decisions without "
        "expert review of each detection."
    ),
    task="segmentation",
    task_name="plume-segmentation",
    default_class_names=DEFAULT_CLASS_NAMES,
    default_channels=(Channel("red", 640.0), Channel("green", 550.0), Channel("blue", 460.0), Channel("ch4_mag1c")),
    group_kind="spatial-block",
    default_backbone="vit_tiny_patch16_224",
    default_peft_targets=("qkv",),
    default_tile_size=32,
    read_samples=read_samples,
    predict=predict_capture,
    screening_channel=screening_channel,
    list_prediction_inputs=list_prediction_inputs,
    write_example=write_example,
    prepare_demo=prepare_demo,
    demo_notes=DEMO_NOTES,
    prediction_suffix=".tif",
    train_flips=True,
    # 64 px blocks (4 x 4 tiles) give the demo-sized capture ~80 leakage groups, so the test split sees
    # enough plumes and backgrounds to be representative (128 px blocks left ~20 and a noisy test score).
    default_block_size=64,
)

__all__ = ["SPEC"]
