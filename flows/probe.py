"""Probe: how good is a backbone's frozen representation on a dataset, beside baselines that keep it honest."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel, Field, model_validator

from flows.error_reporting import report_input_errors
from flows.parameters import DomainName, WorkdirField
from tasks import tracking
from tasks.dataset import read_dataset_info
from tasks.probing.embeddings import ProbeSubject
from tasks.probing.report import gate_registered_subjects_task, record_probe_task, write_outputs_task
from tasks.probing.scoring import ProbeSettings, probe_backbones_task
from tasks.storage import is_url


def _default_subjects(domain: str = "satellite") -> list[ProbeSubject]:
    return [ProbeSubject(label="foundation", model_uri=f"models:/foundation-{domain}@candidate")]


class ProbeParams(BaseModel):
    """Score backbones on a labelled dataset with kNN, linear, few-shot and label-fraction probes.

    Every backbone is compared with random init of its architecture, random convolutional features and
    per-channel image statistics; scores carry bootstrap 95% intervals. A registered foundation encoder
    (``models:/foundation-<domain>@candidate``) can be promoted to ``champion`` when its linear probe beats
    random init with the whole interval above zero.
    """

    domain: DomainName = "satellite"
    dataset: str = Field(..., min_length=1, max_length=1000,
                         description="Labelled dataset folder or URL written by the ingest flow (its test split "
                                     "should hold groups the backbone never saw)")
    workdir: str = WorkdirField
    backbones: list[ProbeSubject] = Field(default_factory=_default_subjects, max_length=16,
                                          description="Backbones to score: registered encoders, catalog entries or "
                                                      "timm ViTs; empty scores the baselines only")
    settings: ProbeSettings = Field(default_factory=ProbeSettings, description="Protocols and their settings")
    promote: bool = Field(False, description="Move champion to each registered backbone whose probe gate passes "
                                             "(its version is tagged with the verdict either way)")

    @model_validator(mode="before")
    @classmethod
    def _domain_candidate_by_default(cls, data):
        # Without backbones, score the chosen domain's candidate: the field's own default can only name one
        # domain, and a radiology probe of models:/foundation-satellite@candidate fails (or scores the wrong bands).
        if isinstance(data, dict) and "backbones" not in data:
            data = {**data, "backbones": _default_subjects(str(data.get("domain", "satellite")))}
        return data


class ProbeReceipt(BaseModel):
    """The MLflow run, where the table and plot are, and the gate's verdicts."""

    run_id: str
    table: str
    plot: str
    target: str
    gate: dict[str, dict]
    promotions: dict[str, str]


@flow(name="probe-backbone", flow_run_name="probe-{params.domain}", log_prints=True)
@report_input_errors
def probe(params: ProbeParams) -> ProbeReceipt:
    """Score backbones and baselines on a dataset; write the table (CSV + MLflow) and the label-fraction plot."""
    info = read_dataset_info(params.dataset)
    local = not is_url(params.workdir)
    with tracking.stage_run(params.domain, "probe", params.workdir, params.model_dump(mode="json"), info,
                            params.dataset, {"vitrail.backbone": ",".join(b.label for b in params.backbones)}) as run:
        cache = Path(params.workdir) / "probe-cache" if local else None
        outcome = probe_backbones_task(params.dataset, params.backbones, params.settings, cache,
                                       Path(params.workdir) / "checkpoints" if local else run.artifact_dir)
        out_dir = (Path(params.workdir) / "probes" / f"{params.domain}-{info.digest[:12]}-{run.run_id[:8]}"
                   if local else run.artifact_dir / "probe-files")
        files = write_outputs_task(outcome, params.settings.gate_metric, out_dir)
        record_probe_task(outcome, files)
        promotions = (gate_registered_subjects_task(outcome, {b.label: b.model_uri for b in params.backbones},
                                                    run.run_id) if params.promote else {})
    return ProbeReceipt(run_id=run.run_id, table=str(files["table"]), plot=str(files["plot"]), target=outcome.target,
                        gate=outcome.gate, promotions=promotions)
