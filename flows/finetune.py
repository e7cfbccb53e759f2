"""Fine-tune: a foundation ViT learns a domain's task through an adapter (LoRA, DoRA, VPT, ...), tracked in MLflow."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, Field, model_validator

from flows.error_reporting import report_input_errors
from flows.parameters import DomainName, WorkdirField
from tasks import tracking
from tasks.bags import BagParams
from tasks.model_inputs import InputNormalisationName
from tasks.dataset import read_dataset_info
from tasks.finetune import fit_adapter_task, record_finetune_task
from tasks.adapters import AdapterParams, legacy_lora_to_adapter
from tasks.models import BackboneParams
from tasks.progress import EpochReporter
from tasks.storage import join_location
from tasks.training import TrainParams


class FinetuneParams(BaseModel):
    """Fine-tune a foundation model on a dataset written by the ingest flow."""

    domain: DomainName = "satellite"
    dataset: str = Field(..., min_length=1, max_length=1000,
                         description="Dataset folder or URL (s3://bucket/prefix) written by the ingest flow")
    workdir: str = WorkdirField
    backbone: BackboneParams = Field(default_factory=BackboneParams, description="Foundation model and its weights")
    adapter: AdapterParams = Field(default_factory=AdapterParams,
                                   description="Adapter method (LoRA, DoRA, VPT, AdaptFormer, ...) and its settings")
    train: TrainParams = Field(default_factory=TrainParams, description="Training settings")
    bags: BagParams = Field(default_factory=BagParams, description="Slide-level learning from bags of tiles "
                                                                   "(attention MIL; histopathology slide labels)")
    input_normalisation: InputNormalisationName = Field(
        "none", description="Input normalisation fitted on the training tiles and kept with the model "
                            "(histopathology: macenko or reinhard stain normalisation)")

    # Configurations written for the LoRA-only block of earlier versions (`lora: {rank: 8, ...}`) keep working.
    _legacy_lora = model_validator(mode="before")(legacy_lora_to_adapter)


class FinetuneReceipt(BaseModel):
    """The MLflow run and logged reference model."""

    run_id: str
    model_uri: str
    best_epoch: int
    best_val_metrics: dict[str, float]


@flow(name="finetune-backbone", flow_run_name="finetune-{params.domain}", log_prints=True)
@report_input_errors
def finetune_backbone(params: FinetuneParams) -> FinetuneReceipt:
    """Train an adapter and head for the chosen domain and log the (merged) model to MLflow."""
    info = read_dataset_info(params.dataset)
    with tracking.stage_run(params.domain, "finetune", params.workdir, params.model_dump(mode="json"), info,
                            params.dataset, {"vitrail.backbone": params.backbone.name, "vitrail.peft": params.adapter.method}) as run:
        outcome = fit_adapter_task(params.dataset, params.backbone, params.adapter, params.train,
                                   join_location(params.workdir, "checkpoints", info.digest[:12]),
                                   EpochReporter(run.run_id, f"finetune {params.backbone.name}"), params.bags,
                                   params.input_normalisation)
        model_uri = record_finetune_task(outcome, run.artifact_dir)
    return FinetuneReceipt(run_id=run.run_id, model_uri=model_uri, best_epoch=outcome.fit.best_epoch,
                           best_val_metrics=outcome.best_validation_metrics)
