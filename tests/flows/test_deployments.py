"""Deployments and UI forms: every preset validates against its flow; every form field is documented."""

import importlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
FLOW_MODULES = ["flows.ingest", "flows.finetune", "flows.pretrain", "flows.probe", "flows.compress", "flows.validate", "flows.promote",
                "flows.predict", "flows.pipeline", "flows.demo", "flows.merge", "flows.rollback"]
# Deployments other services address by name (the registry event relay runs merge/sequential), so their names
# carry no domain.
NAMED_FOR_TRIGGERS = {"sequential"}


def _load(entrypoint: str):
    path, name = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def _public_flows():
    from prefect.flows import Flow

    for name in FLOW_MODULES:
        module = importlib.import_module(name)
        found = [obj for obj in vars(module).values() if isinstance(obj, Flow) and obj.fn.__module__ == name]
        assert len(found) == 1, f"{name} must define exactly one flow, found {len(found)}"
        yield found[0]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_deployment_parameters_validate_against_the_flow(deployment):
    flow = _load(deployment["entrypoint"])
    assert deployment["name"] in NAMED_FOR_TRIGGERS or \
        deployment["name"].startswith(deployment["parameters"]["params"]["domain"] + "-"), \
        "deployment names follow <flow>/<domain>-<preset>"
    flow.validate_parameters(deployment["parameters"])


def test_out_of_bounds_preset_is_rejected():
    from prefect.exceptions import ParameterTypeError

    flow = _load("flows/finetune.py:finetune_backbone")
    with pytest.raises(ParameterTypeError, match="epochs"):
        flow.validate_parameters({"params": {"dataset": "d", "train": {"epochs": 0}}})


def test_every_flow_has_a_deployment():
    entrypoints = {d["entrypoint"] for d in DEPLOYMENTS}
    for flow in _public_flows():
        module = flow.fn.__module__.replace(".", "/") + ".py"
        assert f"{module}:{flow.fn.__name__}" in entrypoints, f"no deployment for {module}"


def test_nightly_predict_is_scheduled():
    scheduled = [d for d in DEPLOYMENTS if d.get("schedules")]
    assert scheduled and {d["entrypoint"] for d in scheduled} == {"flows/predict.py:predict"}
    assert {d["parameters"]["params"]["domain"] for d in scheduled} == {"satellite", "radiology", "hyperspectral"}


def _walk(schema: dict, defs: dict, where: str):
    for name, field in schema.get("properties", {}).items():
        yield f"{where}.{name}", field
        ref = field.get("$ref") or next((a.get("$ref") for a in field.get("anyOf", []) if "$ref" in a), None)
        if ref:
            yield from _walk(defs[ref.split("/")[-1]], defs, f"{where}.{name}")


@pytest.mark.parametrize("flow", list(_public_flows()), ids=lambda f: f.name)
def test_every_form_field_has_a_description_and_no_const(flow):
    schema = flow.parameters.model_dump()
    params = schema["properties"]["params"]
    defs = schema.get("definitions", {})
    root = defs[params["$ref"].split("/")[-1]] if "$ref" in params else params
    for path, field in _walk(root, defs, flow.name):
        assert field.get("description"), f"{path} has no description (the Prefect form would show a bare box)"
        assert "const" not in field, f"{path} is a single-option constant (Prefect UI form bug)"


def test_domain_field_is_a_registry_dropdown():
    from domains import domain_names
    from flows.ingest import IngestParams

    domain = IngestParams.model_json_schema()["properties"]["domain"]
    assert domain["enum"] == domain_names()
    with pytest.raises(Exception, match="unknown domain"):
        IngestParams(domain="astronomy", source="x", out="y")


def test_scale_out_presets_fan_out_on_dask_and_train_on_two_processes():
    by_flow = {(d["entrypoint"], d["name"]): d["parameters"]["params"] for d in DEPLOYMENTS}
    for entrypoint in ("flows/ingest.py:ingest_dataset", "flows/predict.py:predict"):
        runner = _load(entrypoint).validate_parameters(
            {"params": by_flow[(entrypoint, "satellite-dask")]})["params"].runner
        assert runner.kind == "dask" and runner.workers > 1, entrypoint
    finetune = by_flow[("flows/finetune.py:finetune_backbone", "satellite-vit-tiny-lora-ddp2")]
    assert _load("flows/finetune.py:finetune_backbone").validate_parameters(
        {"params": finetune})["params"].train.processes == 2


def test_one_adapter_block_in_every_form_offering_every_registered_method():
    """The forms show one `adapter` block (method + knobs), never the LoRA-only `lora` block it replaced."""
    from tasks.adapters import METHODS

    with_adapter = set()
    for flow in _public_flows():
        schema = flow.parameters.model_dump()
        params = schema["properties"]["params"]
        defs = schema.get("definitions", {})
        root = defs[params["$ref"].split("/")[-1]] if "$ref" in params else params
        for path, field in _walk(root, defs, flow.name):
            name = path.rsplit(".", 1)[-1]
            assert name != "lora", f"{path}: the LoRA-only block is still in the form"
            ref = field.get("$ref") or next((a.get("$ref") for a in field.get("anyOf", []) if "$ref" in a), "")
            if ref.endswith("/AdapterParams"):
                assert name == "adapter", f"{path}: an adapter block under another name"
                method = defs["AdapterParams"]["properties"]["method"]
                assert set(method["enum"]) == set(METHODS), path
                with_adapter.add(flow.name)
    assert {"finetune-backbone", "pipeline"} <= with_adapter, with_adapter
