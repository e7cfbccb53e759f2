"""Histopathology domain: whole-slide images tiled at an exact resolution, tiles classified, scored per slide."""

from __future__ import annotations

from domains.histopathology.demo import DEMO_NOTES, DEMO_SETTINGS, prepare_demo
from domains.histopathology.examples import write_example
from domains.histopathology.prediction import list_prediction_inputs, predict_slide, prediction_name
from domains.histopathology.reader import CHANNELS, DEFAULT_CLASS_NAMES, ingest_table, read_samples, write_ingest_reports
from domains.histopathology.stain import METHODS, apply_model_normalisation, fit_model_normalisation
from domains.spec import DomainSpec

# OpenSlide, tifffile and Pillow are imported inside the functions that use them, so the registry stays light.
SPEC = DomainSpec(
    name="histopathology",
    title=("Histopathology (whole-slide images: SVS, NDPI, MRXS, SCN, tiled TIFF, OME-TIFF, DICOM WSI): tile "
           "classification from QuPath regions, or slide classification from slide labels by attention MIL; "
           "tiles cut at an exact mpp, splits by patient or site"),
    intended_use=(
        "Research on tissue-type and tumour tile classifiers for H&E whole-slide images, with tiles cut at a "
        "stated resolution (um/px), splits by patient and slide metadata kept out of every dataset and "
        "output. Not a medical device: not for diagnosis, grading or any clinical decision. Stain, scanner "
        "and site shift are large in pathology: validate on slides from your own laboratory and scanners "
        "before drawing conclusions; the bundled demo is synthetic tumours planted in one real slide."
    ),
    task="classification",
    task_name="tile-classification",
    default_class_names=DEFAULT_CLASS_NAMES,
    default_channels=CHANNELS,
    group_kind="patient",
    default_backbone="vit_tiny_patch16_224",
    default_peft_targets=("qkv",),
    default_tile_size=224,
    read_samples=read_samples,
    predict=predict_slide,
    list_prediction_inputs=list_prediction_inputs,
    write_example=write_example,
    prepare_demo=prepare_demo,
    demo_notes=DEMO_NOTES,
    prediction_suffix=".json",
    train_flips=True,
    name_prediction=prediction_name,
    write_ingest_reports=write_ingest_reports,
    ingest_table=ingest_table,
    demo_settings=DEMO_SETTINGS,
    input_normalisations=METHODS,
    fit_input_normalisation=fit_model_normalisation,
    apply_input_normalisation=apply_model_normalisation,
)

__all__ = ["SPEC"]
