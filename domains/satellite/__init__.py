"""Satellite multispectral domain: Sentinel-2 and Landsat scenes classified tile by tile."""

from __future__ import annotations

from domains.satellite.demo import DEMO_NOTES, prepare_demo
from domains.satellite.examples import write_example
from domains.satellite.prediction import list_prediction_inputs, predict_scene
from domains.satellite.sensors import SENTINEL2
from domains.satellite.tiling import DEFAULT_CLASS_NAMES, read_samples
from domains.spec import DomainSpec

# Every module above imports rasterio inside the functions that use it, so importing this package (and
# with it the domain registry) stays light.
SPEC = DomainSpec(
    name="satellite",
    title="Satellite multispectral (Sentinel-2, Landsat 8/9): land-cover tile classification",
    intended_use=(
        "Classifying tiles of optical satellite scenes (top-of-atmosphere or surface reflectance) into "
        "broad land-cover classes for mapping, monitoring and research. Not for decisions about people "
        "or property, not validated for cloud-covered scenes, SAR, or sensors other than those listed; "
        "check accuracy on your own region before relying on a map."
    ),
    task="classification",
    task_name="tile-classification",
    default_class_names=DEFAULT_CLASS_NAMES,
    default_channels=SENTINEL2.channels,
    group_kind="spatial-block",
    default_backbone="vit_tiny_patch16_224",
    default_peft_targets=("qkv",),
    default_tile_size=32,
    read_samples=read_samples,
    predict=predict_scene,
    list_prediction_inputs=list_prediction_inputs,
    write_example=write_example,
    prepare_demo=prepare_demo,
    demo_notes=DEMO_NOTES,
    # The radiometric contract: what a model's inputs were, refused by predict when a scene differs.
    input_contract_keys=("sensor", "level", "channels", "scaling", "scaling_units", "cloud_policy", "cloud_mask",
                         "max_cloud_fraction"),
)

__all__ = ["SPEC"]
