"""deploy/helm/*.values.yaml against the charts they are for: each chart's own values.schema.json, and its default
values.yaml for the key names the schema leaves open.

The schemas and defaults are vendored in deploy/helm/schemas (see SOURCES.md there: repository, commit, licence),
so this runs offline. Helm itself validates a release's values against the same schema at install time; the
second check catches what the schemas let through (the Prefect charts allow unknown keys, so a misspelt key would
be silently ignored by the chart).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

HELM = Path(__file__).resolve().parents[2] / "deploy" / "helm"
CHARTS = ("prefect-server", "prefect-worker", "mlflow")
# Sub-charts whose own values the parent's defaults do not list (Bitnami PostgreSQL/Redis): only `enabled` is used.
SUBCHARTS = {"postgresql", "redis", "mysql", "minio"}


def _values(chart: str) -> dict:
    return yaml.safe_load((HELM / f"{chart}.values.yaml").read_text())


def _schema(chart: str) -> dict:
    return json.loads((HELM / "schemas" / f"{chart}.values.schema.json").read_text())


def _defaults(chart: str) -> dict:
    return yaml.safe_load((HELM / "schemas" / f"{chart}.values.yaml").read_text())


def merged(defaults: dict, values: dict) -> dict:
    """``values`` laid over the chart's defaults key by key, as Helm does before it checks the schema."""
    out = dict(defaults)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def schema_errors(chart: str, values: dict) -> list[str]:
    """What the chart's schema says about ``values`` merged over its defaults (Helm validates the merged values)."""
    import jsonschema

    schema = _schema(chart)
    # The Prefect charts declare "http://json-schema.org/schema#", which names no draft; Helm reads them as draft 7.
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    if schema.get("$schema") == "http://json-schema.org/schema#":
        cls = jsonschema.Draft7Validator
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in cls(schema).iter_errors(merged(_defaults(chart), values))]


def unknown_keys(values: dict, defaults: dict, path: str = "") -> list[str]:
    """Key paths of ``values`` that the chart's defaults do not have, where the defaults name their keys.

    A default that is an empty map (``extraEnvVars: {}``, ``podLabels: {}``) is free-form, so anything goes there.
    """
    found = []
    for key, value in values.items():
        where = f"{path}.{key}" if path else key
        if not path and key in SUBCHARTS:
            continue
        if key not in defaults:
            found.append(where)
        elif isinstance(value, dict) and isinstance(defaults[key], dict) and defaults[key]:
            found.extend(unknown_keys(value, defaults[key], where))
    return found


@pytest.mark.parametrize("chart", CHARTS)
def test_values_validate_against_the_charts_schema(chart: str) -> None:
    errors = schema_errors(chart, _values(chart))
    assert not errors, f"deploy/helm/{chart}.values.yaml does not fit the chart's schema:\n" + "\n".join(errors)


@pytest.mark.parametrize("chart", CHARTS)
def test_values_use_only_keys_the_chart_knows(chart: str) -> None:
    assert unknown_keys(_values(chart), _defaults(chart)) == []


def test_the_checks_catch_a_wrong_type_and_a_misspelt_key() -> None:
    values = _values("prefect-worker")
    assert schema_errors("prefect-worker", values) == []
    values["worker"]["config"]["installPolicy"] = "sometimes"
    assert schema_errors("prefect-worker", values) == [
        "worker.config.installPolicy: 'sometimes' is not one of ['always', 'if-not-present', 'never', 'prompt']"]
    values["worker"]["confg"] = values["worker"].pop("config")
    assert unknown_keys(values, _defaults("prefect-worker")) == ["worker.confg"]


def test_the_releases_agree_with_each_other() -> None:
    """The worker's server, pool and secret match the server release and deploy/prefect.yaml; the MLflow proxy is on."""
    server, worker, mlflow = (_values(chart) for chart in CHARTS)
    deployments = yaml.safe_load((HELM.parent / "prefect.yaml").read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} == {worker["worker"]["config"]["workPool"]}
    assert worker["worker"]["selfHostedServerApiConfig"]["basicAuth"]["existingSecret"] == \
        server["server"]["basicAuth"]["existingSecret"]
    assert worker["worker"]["selfHostedServerApiConfig"]["apiUrl"].endswith(":4200/api")
    assert server["backgroundServices"]["runAsSeparateDeployment"] and \
        server["backgroundServices"]["messaging"]["broker"] == "prefect_redis.messaging"
    assert mlflow["artifactRoot"]["proxiedArtifactStorage"] and mlflow["auth"]["appName"] == "basic-auth"
    env = {item["name"] for item in worker["worker"]["extraEnvVars"]}
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= env
    assert not any(name.startswith("AWS_") for name in env), "clients reach artifacts through MLflow, not S3"
