"""Lineage: the chain behind any registered version, read from what the registry and its runs already record.

A version registered by the promote stage names its runs in tags (``vitrail.finetune_model``,
``vitrail.compress_run_id``, ``vitrail.validate_run_id``, ``vitrail.promote_run_id``) and its twin; every stage
run carries the dataset digest and sources, the git commit and the Prefect flow run (``tasks.tracking.stage_run``).
Nothing is recomputed: a missing link is reported as missing.
"""

from __future__ import annotations

import json

from tasks.request_errors import RequestError

# Parameter prefixes of the finetune and compress runs that make up the backbone and the compression recipe.
BACKBONE_PARAMS = "backbone."
ADAPTER_PARAMS = "adapter."
COMPRESSION_PARAMS = "compression."
APPROVAL_PREFIXES = ("vitrail.approval.", "vitrail.rollback_approval.", "vitrail.rollback.", "vitrail.rolled_back",
                     "vitrail.champion_since")


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``.

    Raises:
        RequestError: any other URI (a lineage is kept for registered versions only).
    """
    rest = model_uri.strip().removeprefix("models:/")
    if rest == model_uri.strip() or not rest:
        raise RequestError(f"{model_uri}: lineage needs a registered model URI, models:/NAME/VERSION or "
                           "models:/NAME@ALIAS")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, None, alias
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise RequestError(f"{model_uri}: expected models:/NAME/VERSION (a version number) or models:/NAME@ALIAS")
    return name, version, None


def _stage(run: dict) -> dict:
    tags = run["tags"]
    return {"run_id": run["run_id"], "stage": tags.get("vitrail.stage", "unknown"), "run_name": run["run_name"],
            "status": run["status"], "git_commit": tags.get("vitrail.git_commit"),
            "prefect_flow_run": {"id": tags.get("vitrail.prefect_flow_run_id"),
                                 "name": tags.get("vitrail.prefect_flow_run_name")},
            "dataset_digest": tags.get("vitrail.dataset_digest")}


def _prefixed(mapping: dict[str, str], prefix: str) -> dict[str, str]:
    return {key.removeprefix(prefix): value for key, value in sorted(mapping.items()) if key.startswith(prefix)}


def model_lineage(model_uri: str) -> dict:
    """The lineage of a registered version as a JSON-ready dict (see the module docstring)."""
    from tasks import tracking

    name, version, alias = parse_model_uri(model_uri)
    if alias is not None:
        holder = tracking.alias_holder(name, alias)
        if holder is None:
            raise RequestError(f"{model_uri}: no version of {name} holds the alias '{alias}'")
        version = holder[0]
    record = tracking.model_version(name, version)
    tags = dict(record.tags)

    runs: dict[str, dict] = {}
    missing: list[str] = []

    def read(run_id: str | None, label: str) -> None:
        if not run_id or run_id in runs:
            return
        try:
            runs[run_id] = tracking.run_record(run_id)
        except RequestError:
            missing.append(f"{label} run {run_id} (deleted or in another tracking store)")

    finetune_uri = tags.get("vitrail.finetune_model")
    finetune_run = tracking.logged_model_run_id(finetune_uri) if finetune_uri else None
    read(finetune_run, "finetune")
    read(tags.get("vitrail.compress_run_id"), "compress")
    read(tags.get("vitrail.validate_run_id"), "validate")
    read(tags.get("vitrail.promote_run_id"), "promote")
    read(record.run_id, "source")  # the run that logged the registered model (finetune, compress or merge)
    by_stage = {run["tags"].get("vitrail.stage", "unknown"): run for run in runs.values()}
    finetune = by_stage.get("finetune")
    compress = by_stage.get("compress")
    merge = by_stage.get("merge")
    trained = finetune or merge

    datasets: dict[str, dict] = {}
    for run in runs.values():
        digest = run["tags"].get("vitrail.dataset_digest")
        if digest and digest not in datasets:
            sources = run["tags"].get("vitrail.dataset_sources")
            datasets[digest] = {"digest": digest, "task": run["tags"].get("vitrail.task"),
                                "sources": json.loads(sources) if sources else None,
                                "locations": sorted({json.loads(d["source"]).get("uri", d["source"])
                                                     if d["source"].startswith("{") else d["source"]
                                                     for d in run["datasets"]}),
                                "recorded_by": []}
        if digest:
            datasets[digest]["recorded_by"].append(run["tags"].get("vitrail.stage", run["run_id"]))

    params = trained["params"] if trained else {}
    backbone = _prefixed(params, BACKBONE_PARAMS)
    constituents = tags.get("vitrail.merge.constituents")
    reasons = tags.get("vitrail.gate_reasons") or tags.get("vitrail.merge.gate_reasons")
    lineage = {
        "model": {"name": name, "version": version, "uri": f"models:/{name}/{version}",
                  "aliases": list(record.aliases or []), "source": record.source, "run_id": record.run_id,
                  "twin": ({"name": tags["vitrail.twin_name"], "version": tags.get("vitrail.twin_version")}
                           if "vitrail.twin_name" in tags else None)},
        "datasets": list(datasets.values()),
        "code": sorted({run["tags"].get("vitrail.git_commit", "unknown") for run in runs.values()}),
        "runs": sorted((_stage(run) for run in runs.values()), key=lambda stage: runs[stage["run_id"]]["start_time_ms"]
                       or 0),
        "parameters": params,
        "parent": {"finetune_model": finetune_uri,
                   "merged_from": json.loads(constituents) if constituents else None,
                   "merge_method": tags.get("vitrail.merge.method")},
        # Catalog weights carry their licence to every registered version (tasks.backbone_catalog.licence_tags).
        "foundation_backbone": {**backbone, "tag": (trained or {}).get("tags", {}).get("vitrail.backbone"),
                                "catalog": {key: value for key, value in sorted(tags.items())
                                            if key.startswith(("vitrail.catalog_entry", "vitrail.licence"))} or None}
        if trained else None,
        "adapter": _prefixed(params, ADAPTER_PARAMS) or None,
        # The variant the compress stage chose, and the recipe it was asked for (its edge_variant may be "auto").
        "compression": ({"edge_variant": compress["tags"].get("vitrail.edge_variant"),
                         "recipe": _prefixed(compress["params"], COMPRESSION_PARAMS)} if compress else
                        {"edge_variant": tags.get("vitrail.edge_variant"), "recipe": None}
                        if tags.get("vitrail.edge_variant") else None),
        "gate": {"result": tags.get("vitrail.gate") or tags.get("vitrail.merge.gate"),
                 "alias_granted": tags.get("vitrail.alias"),
                 "reasons": reasons.split("; ") if reasons else [],
                 "metrics": {key: value for key, value in sorted(tags.items())
                             if key.startswith(("vitrail.edge_", "vitrail.reference_"))}},
        "approvals": {key: value for key, value in sorted(tags.items()) if key.startswith(APPROVAL_PREFIXES)},
        "missing": missing,
    }
    return lineage


def format_lineage(lineage: dict) -> str:
    """The lineage as text for a terminal, one section per link of the chain."""
    model = lineage["model"]
    out = [f"{model['uri']}" + (f"  @ {', '.join(model['aliases'])}" if model["aliases"] else ""),
           f"  source     {model['source']}"]
    if model["twin"]:
        out.append(f"  twin       models:/{model['twin']['name']}/{model['twin']['version']}")
    out.append("dataset")
    for dataset in lineage["datasets"] or [{"digest": "not recorded"}]:
        out.append(f"  digest     {dataset['digest']}" + (f"  ({dataset.get('task')})" if dataset.get("task") else ""))
        for source in dataset.get("sources") or []:
            out.append(f"  source     {source}")
        for location in dataset.get("locations") or []:
            out.append(f"  stored at  {location}")
    out.append(f"code         {', '.join(lineage['code']) or 'not recorded'}")
    out.append("runs (MLflow run -> Prefect flow run)")
    for run in lineage["runs"]:
        flow_run = run["prefect_flow_run"]
        out.append(f"  {run['stage']:<10} {run['run_id']}  {run['status']:<9} prefect {flow_run['name']} "
                   f"({flow_run['id']})  commit {(run['git_commit'] or '?')[:12]}")
    parent = lineage["parent"]
    out.append("parent")
    out.append(f"  fine-tune  {parent['finetune_model'] or 'not recorded'}")
    if parent["merged_from"]:
        out.append(f"  merged     {parent['merge_method']} of {json.dumps(parent['merged_from'])}")
    backbone = lineage["foundation_backbone"] or {}
    out.append(f"backbone     {backbone.get('name', 'not recorded')}  weights {backbone.get('weights', '?')}"
               + (f" ({backbone['weights_file']})" if backbone.get("weights_file") not in (None, "None") else ""))
    if backbone.get("catalog"):
        out.append(f"  licence    {json.dumps(backbone['catalog'])}")
    if lineage["adapter"]:
        out.append(f"adapter      {json.dumps(lineage['adapter'])}")
    out.append(f"compression  {json.dumps(lineage['compression']) if lineage['compression'] else 'not recorded'}")
    gate = lineage["gate"]
    out.append(f"gate         {gate['result'] or 'not recorded'}" +
               (f" -> {gate['alias_granted']}" if gate["alias_granted"] else ""))
    out += [f"  - {reason}" for reason in gate["reasons"]]
    out += [f"  {key} = {value}" for key, value in gate["metrics"].items()]
    out.append("approvals and moves" if lineage["approvals"] else "approvals and moves: none recorded")
    out += [f"  {key} = {value}" for key, value in lineage["approvals"].items()]
    if lineage["parameters"]:
        out.append(f"parameters   {len(lineage['parameters'])} recorded (--json lists them)")
    if lineage["missing"]:
        out += ["missing"] + [f"  {item}" for item in lineage["missing"]]
    return "\n".join(out)
