"""Demo: the whole pipeline on a small real scene shipped with the project, in a few minutes on 2 cores."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel, Field

from domains import get_domain
from flows.error_reporting import report_input_errors
from flows.parameters import DomainName, WorkdirField
from flows.pipeline import PipelineParams, PipelineReceipt, pipeline
from tasks.demo import prepare_demo_inputs_task
from tasks.models import BackboneParams
from tasks.training import TrainParams


class DemoParams(BaseModel):
    """Run the end-to-end demo of one domain."""

    domain: DomainName = "satellite"
    workdir: str = WorkdirField
    epochs: int = Field(12, ge=1, le=200, description="Training epochs (the demo default takes about a minute)")


@flow(name="demo", flow_run_name="demo-{params.domain}", log_prints=True)
@report_input_errors
def demo(params: DemoParams) -> PipelineReceipt:
    """Prepare the domain's demo data and labels, then run the full pipeline on them."""
    inputs = prepare_demo_inputs_task(params.domain, Path(params.workdir) / "demo-data")
    settings = get_domain(params.domain).demo_settings  # e.g. histopathology learns slide labels (bags)
    train = TrainParams(**{**settings.get("train", {}), "epochs": params.epochs})
    backbone = BackboneParams(**{"name": "vit_tiny_patch16_224", "weights": "none", "patch_size": 4,
                                 **settings.get("backbone", {})})
    return pipeline(PipelineParams(
        **{key: value for key, value in settings.items() if key not in ("train", "backbone")},
        domain=params.domain, source=inputs["source"], labels=inputs["labels"], workdir=params.workdir,
        backbone=backbone, train=train,
    ))
