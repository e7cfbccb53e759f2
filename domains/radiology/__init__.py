"""Radiology domain: DICOM and NIfTI studies, de-identified on read, findings scored per image and study."""

from __future__ import annotations

from domains.radiology.demo import DEMO_NOTES, prepare_demo
from domains.radiology.examples import write_example
from domains.radiology.deidentify import write_ingest_reports
from domains.radiology.prediction import list_prediction_inputs, prediction_name, predict_study
from domains.radiology.sampling import DEFAULT_FINDINGS, read_samples
from domains.spec import Channel, DomainSpec

# pydicom, nibabel and scipy are imported inside the functions that use them, so the registry stays light.
SPEC = DomainSpec(
    name="radiology",
    title=("Radiology (DICOM CT/MR/CR/DX, NIfTI): multi-label findings per image and study, or segmentation from "
           "NIfTI masks; de-identified on read"),
    intended_use=(
        "Research on multi-label findings classifiers and lesion/organ segmentation for radiographs and CT/MR "
        "slices, with every input "
        "de-identified (DICOM PS3.15 basic profile) before use and splits by patient. Not a medical device: "
        "not for diagnosis, triage or any clinical decision. Validate on your own scanners and population "
        "before drawing conclusions; the bundled demo is synthetic phantoms, not patients."
    ),
    task="multilabel",
    task_name="findings",
    default_class_names=DEFAULT_FINDINGS,
    default_channels=(Channel(name="image"),),
    group_kind="patient",
    default_backbone="vit_tiny_patch16_224",
    default_peft_targets=("qkv",),
    default_tile_size=32,
    read_samples=read_samples,
    predict=predict_study,
    list_prediction_inputs=list_prediction_inputs,
    write_example=write_example,
    prepare_demo=prepare_demo,
    demo_notes=DEMO_NOTES,
    prediction_suffix=".json",
    train_flips=False,
    name_prediction=prediction_name,
    write_ingest_reports=write_ingest_reports,
)

__all__ = ["SPEC"]
