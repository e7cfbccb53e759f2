"""Pretrain: a ViT learns a domain from its unlabelled tiles (masked autoencoder), registered as foundation-<domain>."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel, Field

from flows.error_reporting import report_input_errors
from flows.parameters import DomainName, WorkdirField
from tasks import tracking
from tasks.dataset import read_dataset_info
from tasks.models import BackboneParams
from tasks.pretraining import MaeParams, pretrain_encoder_task, record_pretraining_task
from tasks.probing.report import probe_gate_candidate_task
from tasks.probing.scoring import ProbeSettings
from tasks.progress import EpochReporter
from tasks.storage import is_url, join_location
from tasks.training import TrainParams


def _gate_settings() -> ProbeSettings:
    # The gate needs the linear probe against random init; few-shot draws and the curve are `vitrail probe`'s.
    return ProbeSettings(shots=[], label_fractions=[0.1, 1.0])


class ProbeGateParams(BaseModel):
    """The probe gate: the encoder becomes champion only if its frozen features beat random init's."""

    enabled: bool = Field(True, description="Probe the new encoder on the dataset's labelled splits (its test "
                                            "split was never pretrained on) and promote it to champion when the "
                                            "linear probe beats random init with the 95% interval above zero")
    settings: ProbeSettings = Field(default_factory=_gate_settings, description="Probe protocols and the gate's metric")


def _pretrain_defaults() -> TrainParams:
    # MAE trains longer and with stronger weight decay than a fine-tune (He et al. 2022 use 0.05).
    return TrainParams(epochs=20, learning_rate=1e-3, weight_decay=0.05, warmup_epochs=1.0)


class PretrainParams(BaseModel):
    """Pretrain a foundation ViT on a dataset's unlabelled tiles with a masked autoencoder.

    Every tile outside the test and validation splits is used, labels or not; the test split's groups
    are never seen (their digest is recorded). The encoder is registered as ``foundation-<domain>`` with
    the alias ``candidate``; fine-tune it with ``backbone.weights=file`` and the encoder file the run prints.
    """

    domain: DomainName = "satellite"
    dataset: str = Field(..., min_length=1, max_length=1000,
                         description="Dataset folder or URL (s3://bucket/prefix) written by the ingest flow")
    workdir: str = WorkdirField
    backbone: BackboneParams = Field(default_factory=BackboneParams,
                                     description="Encoder architecture and where it starts: random weights, or a "
                                                 "catalog entry / checkpoint file for continued pretraining")
    mae: MaeParams = Field(default_factory=MaeParams, description="Masking ratio and decoder of the masked autoencoder")
    train: TrainParams = Field(default_factory=_pretrain_defaults,
                               description="Training settings (the objective is always the reconstruction loss)")
    probe_gate: ProbeGateParams = Field(default_factory=ProbeGateParams,
                                        description="Promote to champion only when the encoder beats random init")


class PretrainReceipt(BaseModel):
    """The MLflow run, the registered encoder and where its files are."""

    run_id: str
    registered_model: str
    version: str
    alias: str
    model_uri: str
    encoder_file: str
    description_file: str
    best_epoch: int
    val_reconstruction_loss: float
    samples_seen: int
    probe_gate: str = Field(description="passed, failed, or skipped (turned off or no labelled splits)")
    champion: bool = Field(description="The probe gate moved the champion alias to this version")
    probe_table: str = Field("", description="The gate's probe table (CSV), when it ran")


@flow(name="pretrain-backbone", flow_run_name="pretrain-{params.domain}", log_prints=True)
@report_input_errors
def pretrain(params: PretrainParams) -> PretrainReceipt:
    """Masked-autoencoder pretraining of a ViT on the domain's unlabelled tiles; registers the encoder as a candidate.

    The probe gate then scores the encoder against random init on the dataset's labelled splits and moves
    ``champion`` to it only when it wins with the whole 95% interval above zero.
    """
    info = read_dataset_info(params.dataset)
    with tracking.stage_run(params.domain, "pretrain", params.workdir, params.model_dump(mode="json"), info,
                            params.dataset, {"vitrail.backbone": params.backbone.name, "vitrail.method": "mae"}) as run:
        # The encoder's files stay in the work folder (the fine-tune stage reads them from there); a work
        # folder on object storage keeps them in the run's artifacts only.
        out_dir = (run.artifact_dir / "encoder-files" if is_url(params.workdir)
                   else Path(params.workdir) / "encoders" / f"{params.domain}-{info.digest[:12]}-{run.run_id[:8]}")
        outcome = pretrain_encoder_task(params.dataset, params.backbone, params.mae, params.train,
                                        join_location(params.workdir, "checkpoints", f"pretrain-{info.digest[:12]}"),
                                        out_dir, EpochReporter(run.run_id, f"pretrain {params.backbone.name}"))
        name, version, alias = record_pretraining_task(outcome, params.domain)
        verdict, promoted, table = "skipped", None, ""
        if params.probe_gate.enabled:
            verdict, promoted, table = probe_gate_candidate_task(params.dataset, outcome.description_file,
                                                                 params.probe_gate.settings, name, version,
                                                                 run.run_id, out_dir / "probe")
    return PretrainReceipt(run_id=run.run_id, registered_model=name, version=version, alias=alias,
                           model_uri=f"models:/{name}@{alias}", encoder_file=str(outcome.encoder_file),
                           description_file=str(outcome.description_file), best_epoch=outcome.fit.best_epoch,
                           val_reconstruction_loss=outcome.description["val_reconstruction_loss"],
                           samples_seen=outcome.description["samples_seen"], probe_gate=verdict,
                           champion=promoted is not None, probe_table=table)
