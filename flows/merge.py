"""Merge: fine-tunes of one base become one model (soups, task arithmetic, TIES, DARE, OPCM, Frank-Wolfe),
gated against each constituent and registered with its lineage; or one newly registered fine-tune is folded
into the running merged model (OPCM, constant memory)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow
from pydantic import BaseModel, Field

from flows.compress import CompressFlowParams, CompressReceipt, compress
from flows.error_reporting import report_input_errors
from flows.parameters import DomainName, WorkdirField
from flows.validate import ValidateParams, ValidateReceipt, validate
from tasks import tracking
from tasks.compression.recipe import CompressParams
from tasks.merging import MergeParams
from tasks.merging.stage import (
    HeadMode,
    MergeGateParams,
    SelectionParams,
    decide_merge_gate_task,
    fold_arriving_model_task,
    merge_selection_task,
    record_merge_task,
    record_sequence_task,
    running_state_name,
    score_against_constituents_task,
)


class MergeFlowParams(BaseModel):
    """Merge registered fine-tunes of one foundation model, or fold a newly registered one into a running merge.

    Every fine-tune must come from the same base (its weights digest, recorded when it was fine-tuned) and take
    the same inputs (bands, tile size, normalisation). Each merged model is scored on every constituent's test
    split and must keep ``gate.min_share`` of that constituent's own score; it is registered with its lineage
    (constituents, method, coefficients) and, when it passes, the alias ``candidate``.
    """

    domain: DomainName = "satellite"
    workdir: str = WorkdirField
    selection: SelectionParams = Field(default_factory=SelectionParams,
                                       description="The registered fine-tunes to merge (names, URIs, a tag or a "
                                                   "registry search); not used when a model is arriving")
    arriving: str = Field("", max_length=1000,
                          description="A newly registered fine-tune, models:/NAME/VERSION: fold it into the running "
                                      "merged model with OPCM (sequential merging) instead of merging the selection")
    running: str = Field("", max_length=200, description="Name of the running sequential merge (its state is "
                                                         "registered as <name>-state); empty: <domain>-opcm")
    merge: MergeParams = Field(default_factory=MergeParams, description="Merging method and its settings "
                                                                        "(sequential merging always uses opcm)")
    heads: HeadMode = Field("auto", description="Classifier heads: auto merges them only when every fine-tune has "
                                                "the same classes; per-task keeps each fine-tune's head on the "
                                                "merged backbone; shared merges them (same classes required)")
    gate: MergeGateParams = Field(default_factory=MergeGateParams,
                                  description="Share of each constituent's own test score a merged model must keep")
    max_val_samples: int = Field(512, ge=16, le=1_000_000, description="Validation samples per task that greedy "
                                                                       "soup and Frank-Wolfe score candidates on")
    compress: bool = Field(True, description="Also compress and validate every merged model (edge artifact and a "
                                             "validate run, ready for the promote stage)")
    compression: CompressParams = Field(default_factory=CompressParams,
                                        description="Export, quantization and timing of the merged models")


class MergedModel(BaseModel):
    """One merged model as registered, with its edge model and validation runs when compressed."""

    name: str
    version: str
    model_uri: str
    alias: str | None
    datasets: list[str]
    compress_run_id: str | None = None
    edge_model_uri: str | None = None
    validate_run_ids: list[str] = Field(default_factory=list)


class MergeReceipt(BaseModel):
    """The merge run, the gate's verdict and the registered models."""

    run_id: str
    method: str
    mode: str
    constituents: list[str]
    coefficients: list[float]
    gate_passed: bool
    gate_reasons: list[str]
    models: list[MergedModel]
    state_version: str | None = None


def _compressed(record, params: MergeFlowParams) -> tuple[CompressReceipt, list[ValidateReceipt]]:
    common = dict(domain=params.domain, workdir=params.workdir)
    edge = compress(CompressFlowParams(**common, dataset=record.datasets[0], model_uri=record.model_uri,
                                       compression=params.compression))
    return edge, [validate(ValidateParams(**common, dataset=dataset, model_uri=record.model_uri,
                                          compress_run_id=edge.run_id, threads=params.compression.threads))
                  for dataset in record.datasets]


@flow(name="merge", flow_run_name="merge-{params.domain}", log_prints=True)
@report_input_errors
def merge(params: MergeFlowParams = MergeFlowParams(), arriving: str = "") -> MergeReceipt:
    """Merge the selected fine-tunes (or fold the arriving one into the running merge), gate, register.

    Args:
        params: what to merge, how, and the gate.
        arriving: a newly registered fine-tune, models:/NAME/VERSION, folded into the running merge with OPCM;
            overrides params.arriving (the registry event relay sets it).
    """
    arriving = arriving or params.arriving
    state_name = running_state_name(params.domain, params.running)
    with tracking.stage_run(params.domain, "merge", params.workdir, params.model_dump(mode="json"),
                            extra_tags={"vitrail.merge.arriving": arriving or "none"}) as run, \
            tempfile.TemporaryDirectory(prefix="vitrail-merge-") as scratch:
        outcome = (fold_arriving_model_task(arriving, state_name, params.merge.opcm_alpha, params.heads, Path(scratch))
                   if arriving else merge_selection_task(params.selection, params.merge, params.heads,
                                                         params.max_val_samples))
        scores = score_against_constituents_task(outcome, params.gate, run.artifact_dir / "plots")
        gate = decide_merge_gate_task(scores, params.gate)
        records = record_merge_task(outcome, scores, gate)
        state_version = record_sequence_task(outcome, gate, state_name, Path(scratch)) if arriving else None
    compressed = [_compressed(record, params) if params.compress else (None, []) for record in records]
    models = [MergedModel(name=r.name, version=r.version, model_uri=r.model_uri, alias=r.alias, datasets=r.datasets,
                          compress_run_id=edge.run_id if edge else None,
                          edge_model_uri=edge.edge_model_uri if edge else None,
                          validate_run_ids=[v.run_id for v in checks])
              for r, (edge, checks) in zip(records, compressed)]
    return MergeReceipt(run_id=run.run_id, method=outcome.lineage["method"],
                        mode="sequential" if arriving else "batch", constituents=outcome.lineage["constituents"],
                        coefficients=outcome.lineage["coefficients"], gate_passed=gate.passed,
                        gate_reasons=list(gate.reasons), models=models, state_version=state_version)
