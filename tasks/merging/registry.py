"""Finding the fine-tunes to merge in the MLflow registry: by URI, name, alias, tag or search filter.

The merge stage needs three registry reads :mod:`tasks.tracking` does not offer (version search, the
version an alias points at, and the fine-tune run's dataset parameter); they live here, beside their only
user, and every model is loaded through :mod:`tasks.tracking` as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.request_errors import RequestError


@dataclass(frozen=True)
class ModelRef:
    """One constituent: a label for lineage (``name/version`` for registered models), its URI, its registered
    name (None for a run's model)."""

    label: str
    uri: str
    registered_name: str | None = None
    version: str | None = None


def _client():
    from tasks import tracking  # noqa: F401  (tracking sets MLflow up; the client then reads the same store)
    from mlflow import MlflowClient

    return MlflowClient()


def _version_ref(name: str, version: str) -> ModelRef:
    return ModelRef(label=f"{name}/{version}", uri=f"models:/{name}/{version}", registered_name=name,
                    version=str(version))


def resolve_model(spec: str) -> ModelRef:
    """``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``NAME``, ``NAME/VERSION``, ``NAME@ALIAS`` or a
    ``runs:/`` URI as one constituent; a name alone means its newest version, an alias is pinned to the
    version it points at now (the lineage names versions, never aliases that move)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    if spec.startswith("runs:/") or "://" in spec:
        return ModelRef(label=spec, uri=spec)
    body = spec.removeprefix("models:/")
    try:
        if "@" in body:
            name, alias = body.rsplit("@", 1)
            return _version_ref(name, client.get_model_version_by_alias(name, alias).version)
        if "/" in body:
            name, version = body.rsplit("/", 1)
            client.get_model_version(name, version)
            return _version_ref(name, version)
        versions = client.search_model_versions(f"name = '{body}'")
    except MlflowException as error:
        raise RequestError(f"{spec}: no such registered model version ({error.message})") from None
    if not versions:
        raise RequestError(f"{spec}: no registered model of this name")
    return _version_ref(body, str(max(int(v.version) for v in versions)))


def search_models(filter_string: str) -> list[ModelRef]:
    """Every registered version matching an MLflow search filter (e.g. ``name LIKE 'satellite-%'`` or
    ``tags.`vitrail.site` = 'north'``), oldest first within each name."""
    from mlflow.exceptions import MlflowException

    try:
        versions = _client().search_model_versions(filter_string)
    except MlflowException as error:
        raise RequestError(f"registry search {filter_string!r} refused: {error.message}") from None
    return [_version_ref(v.name, v.version) for v in sorted(versions, key=lambda v: (v.name, int(v.version)))]


def tag_filter(tag: str) -> str:
    """``KEY=VALUE`` as a search filter on version tags."""
    key, sep, value = tag.partition("=")
    if not sep or not key.strip():
        raise RequestError(f"tag {tag!r}: expected KEY=VALUE (e.g. vitrail.site=north)")
    return f"tags.`{key.strip()}` = '{value.strip()}'"


def select_models(models: list[str], tag: str = "", search: str = "") -> list[ModelRef]:
    """The constituents named, tagged and found, each once, in that order."""
    refs = [resolve_model(m) for m in models]
    if tag:
        refs += search_models(tag_filter(tag))
    if search:
        refs += search_models(search)
    unique: dict[str, ModelRef] = {}
    for ref in refs:
        unique.setdefault(ref.uri, ref)
    return list(unique.values())


def finetune_dataset(model_uri: str) -> str:
    """The dataset location the fine-tune run that logged ``model_uri`` trained on (its ``dataset`` parameter)."""
    from mlflow.models import get_model_info

    run_id = get_model_info(model_uri).run_id
    if not run_id:
        raise RequestError(f"{model_uri}: no run recorded with this model, so its dataset is unknown")
    params = _client().get_run(run_id).data.params
    if "dataset" not in params:
        raise RequestError(f"{model_uri}: run {run_id} records no dataset parameter (not a fine-tune run?)")
    return params["dataset"]
