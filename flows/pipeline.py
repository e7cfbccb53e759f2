"""Pipeline: ingest, fine-tune, compress, validate, promote and predict, chained as one reproducible run."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, Field, model_validator

from flows.compress import CompressFlowParams, CompressReceipt, compress
from flows.error_reporting import report_input_errors
from flows.finetune import FinetuneParams, FinetuneReceipt, finetune_backbone
from flows.ingest import IngestParams, IngestReceipt, TilingParams, ingest_dataset
from flows.parameters import DomainName, WorkdirField
from flows.predict import PredictParams, PredictReceipt, predict
from flows.promote import PromoteParams, PromoteReceipt, promote
from flows.validate import ValidateParams, ValidateReceipt, validate
from tasks.compression.recipe import CompressParams
from tasks.bags import BagParams
from tasks.model_inputs import InputNormalisationName
from tasks.dataset import SplitParams
from tasks.adapters import AdapterParams, legacy_lora_to_adapter
from tasks.models import BackboneParams
from tasks.approval import ApprovalPolicy
from tasks.promotion import GateThresholds
from tasks.storage import join_location
from tasks.tracking import configure_tracking
from tasks.training import TrainParams


class PipelineParams(BaseModel):
    """Everything from raw source to a promoted model and a prediction map, in one run."""

    domain: DomainName = "satellite"
    source: str = Field(..., min_length=1, max_length=1000,
                        description="The domain's input to learn from: scene folder or multi-band GeoTIFF (satellite), "
                                    "folder of DICOM/NIfTI studies (radiology), ENVI cube (hyperspectral), slide or "
                                    "folder of slides (histopathology)")
    labels: str = Field(..., min_length=1, max_length=1000,
                        description="Labels: class raster (satellite), findings CSV (radiology), plume mask "
                                    "(hyperspectral), slide manifest CSV (histopathology)")
    workdir: str = WorkdirField
    dataset: str | None = Field(None, min_length=1, max_length=1000,
                                description="Where the dataset is written: a folder or URL (s3://bucket/prefix); "
                                            "empty writes it to <workdir>/dataset")
    bands: list[str] | None = Field(None, max_length=512,
                                    description="Input channels: band names (satellite multi-band file), CT window "
                                                "presets (radiology), band selection (hyperspectral)")
    sensor: str | None = Field(None, max_length=64, description="Sensor band table; empty to infer from file names")
    class_names: list[str] | None = Field(None, max_length=1000, description="Names of label values 0..K-1")
    mpp: float | None = Field(None, gt=0.02, lt=100.0,
                              description="Resolution of the slides in microns per pixel, for whole-slide images "
                                          "whose metadata states none (never guessed from objective power)")
    tiling: TilingParams = Field(default_factory=TilingParams, description="Tiling and blocking")
    split: SplitParams = Field(default_factory=SplitParams, description="Split fractions and seed")
    backbone: BackboneParams = Field(default_factory=BackboneParams, description="Foundation model and its weights")
    adapter: AdapterParams = Field(default_factory=AdapterParams,
                                   description="Adapter method (LoRA, DoRA, VPT, AdaptFormer, ...) and its settings")
    train: TrainParams = Field(default_factory=TrainParams, description="Training settings")
    bags: BagParams = Field(default_factory=BagParams, description="Slide-level learning from bags of tiles "
                                                                   "(attention MIL; histopathology slide labels)")
    input_normalisation: InputNormalisationName = Field(
        "none", description="Input normalisation fitted on the training tiles and kept with the model "
                            "(histopathology: macenko or reinhard stain normalisation)")
    compression: CompressParams = Field(default_factory=CompressParams, description="Export, quantization and timing")
    gate: GateThresholds = Field(default_factory=GateThresholds, description="Promotion thresholds")
    approval: ApprovalPolicy = Field(default_factory=ApprovalPolicy,
                                     description="Human approval before the promotion moves an alias (a form in "
                                                 "the Prefect UI)")

    # Configurations written for the LoRA-only block of earlier versions (`lora: {rank: 8, ...}`) keep working.
    _legacy_lora = model_validator(mode="before")(legacy_lora_to_adapter)

    def dataset_location(self) -> str:
        """The dataset folder or URL: ``dataset`` when given, else ``<workdir>/dataset``."""
        return self.dataset or join_location(self.workdir, "dataset")


class PipelineReceipt(BaseModel):
    """The receipts of every stage."""

    ingest: IngestReceipt
    finetune: FinetuneReceipt
    compress: CompressReceipt
    validation: ValidateReceipt
    promote: PromoteReceipt
    predict: PredictReceipt | None


@flow(name="pipeline", flow_run_name="pipeline-{params.domain}", log_prints=True)
@report_input_errors
def pipeline(params: PipelineParams) -> PipelineReceipt:
    """Run every stage in order; each stage is also runnable on its own."""
    configure_tracking(params.workdir)  # a work folder MLflow cannot use is refused before any work is done
    common = dict(domain=params.domain, workdir=params.workdir)
    ingested = ingest_dataset(IngestParams(
        domain=params.domain, source=params.source, labels=params.labels, out=params.dataset_location(),
        tiling=params.tiling, split=params.split, bands=params.bands, sensor=params.sensor,
        class_names=params.class_names, mpp=params.mpp))
    tuned = finetune_backbone(FinetuneParams(**common, dataset=ingested.dataset, backbone=params.backbone,
                                             adapter=params.adapter, train=params.train, bags=params.bags,
                                             input_normalisation=params.input_normalisation))
    compressed = compress(CompressFlowParams(**common, dataset=ingested.dataset, model_uri=tuned.model_uri,
                                             compression=params.compression))
    validated = validate(ValidateParams(**common, dataset=ingested.dataset, model_uri=tuned.model_uri,
                                        compress_run_id=compressed.run_id, threads=params.compression.threads))
    promoted = promote(PromoteParams(**common, model_uri=tuned.model_uri, edge_model_uri=compressed.edge_model_uri,
                                     compress_run_id=compressed.run_id, validate_run_id=validated.run_id,
                                     gate=params.gate, approval=params.approval))
    # Predict with the candidate's own edge model, so a run whose gate failed still shows its map.
    predicted = predict(PredictParams(**common, input=params.source, model_uri=compressed.edge_model_uri,
                                      output=join_location(params.workdir, "predictions"),
                                      threads=params.compression.threads, mpp=params.mpp))
    return PipelineReceipt(ingest=ingested, finetune=tuned, compress=compressed, validation=validated,
                           promote=promoted, predict=predicted)
