"""The ``vitrail`` command line: one verb per flow, each building the flow's typed parameters.

Heavy libraries (torch, timm, prefect, mlflow) are imported only after the arguments parse, so
``vitrail --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from flows.presets import PRESETS, PRETRAIN_PRESETS, apply_preset, apply_pretrain_preset

DEFAULT_ENV = {
    # No network here and nothing to report: keep Prefect and MLflow from phoning home.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # The ephemeral Prefect server takes 10-15 s to start on a 2-core machine; 20 s is too tight.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}

OVERRIDE_HELP = ("Override any parameter by its dotted path, e.g. --set train.epochs=3 --set adapter.method=dora "
                 "(values are JSON when they parse as JSON, else strings; repeatable)")


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _apply_overrides(payload: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = payload
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return payload


SOURCE_HELP = ("the domain's input: a scene folder of per-band GeoTIFFs or a multi-band GeoTIFF/COG (satellite), "
               "a folder of DICOM series/NIfTI volumes or a DICOMDIR (radiology), an ENVI cube or multi-band "
               "GeoTIFF (hyperspectral)")
LABELS_HELP = ("labels aligned with the source: a class raster (satellite), a findings CSV keyed by patient/study/"
               "series (radiology), a plume mask raster (hyperspectral)")


def _overrides_arg(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help_text or OVERRIDE_HELP)


def _domain_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", default="satellite", help="imaging domain (see `vitrail domains`)")


def _workdir_arg(parser: argparse.ArgumentParser, default: str = "vitrail-work") -> None:
    parser.add_argument("--workdir", default=default,
                        help="work folder for checkpoints, reports and the local MLflow store (default: %(default)s)")


def _source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bands", "--channels", dest="bands", type=_csv,
                        help="input channels, comma-separated: band names in file order (satellite multi-band files), "
                             "CT window presets such as lung,mediastinum,bone (radiology), or a band selection "
                             "(hyperspectral; see the domain's docs)")
    parser.add_argument("--sensor", help="sensor band table: sentinel2, landsat4/5/7/8/9, hls, sentinel1 (default: "
                                         "from file names; given, band files are matched by suffix whatever the prefix)")
    parser.add_argument("--cloud-mask", choices=("none", "qa", "model", "auto"),
                        help="satellite: mask clouds and shadows with the sensor's QA band (qa), the offline "
                             "ukis-csmask model (model) or either (auto); default none")
    parser.add_argument("--task", dest="tile_task", choices=("classification", "segmentation"),
                        help="satellite: segmentation learns a class per pixel from the label raster (default: "
                             "classification, a class per tile)")
    parser.add_argument("--max-cloud-fraction", type=float,
                        help="satellite: drop tiles with more cloud/shadow than this share (default 1: keep all)")
    parser.add_argument("--class-names", type=_csv, help="names of label values 0..K-1, comma-separated")
    parser.add_argument("--tile-size", type=int, help="tile side in pixels (default 32)")
    parser.add_argument("--stride", type=int, help="tile step in pixels (default: the tile size)")
    parser.add_argument("--block-size", type=int, help="spatial block side in pixels for leakage-free splits "
                                                       "(default: the domain's; 128 satellite, 64 hyperspectral)")
    parser.add_argument("--tile-mpp", type=float, help="microns per pixel tiles are cut at (whole-slide images; "
                                                       "default: the domain's, 0.5 for histopathology)")
    parser.add_argument("--group-by", choices=("patient", "site"),
                        help="leakage group of whole-slide images: patient (default) or site (needs a site column "
                             "in the slide manifest)")
    _mpp_arg(parser)


def _mpp_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mpp", type=float, help="the slides' microns per pixel, for whole-slide images whose "
                                                  "metadata states none (never guessed from objective power)")


def _source_payload(args: argparse.Namespace) -> dict:
    tiling = {k: v for k, v in (("tile_size", args.tile_size), ("stride", args.stride),
                                ("block_size", args.block_size), ("tile_mpp", args.tile_mpp),
                                ("group_by", args.group_by), ("cloud_mask", args.cloud_mask),
                                ("max_cloud_fraction", args.max_cloud_fraction),
                                ("task", args.tile_task)) if v is not None}
    if args.tile_size is not None and args.stride is None:
        tiling["stride"] = args.tile_size
    payload: dict = {"tiling": tiling}
    for key in ("bands", "sensor", "class_names", "mpp"):
        if getattr(args, key) is not None:
            payload[key] = getattr(args, key)
    return payload


def _preset_arg(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--preset", choices=list(PRESETS), default=default, metavar="NAME",
                        help=f"named parameter set: {', '.join(PRESETS)} (`vitrail presets` describes them); "
                             "explicit flags and --set override its values (default: "
                             f"{default or 'none, every parameter keeps its default'})")


def _ingest_sources_payload(args: argparse.Namespace) -> dict:
    """``source``/``labels`` for one source; ``sources`` with shared ``labels`` or per-source ``source_labels``."""
    sources = [*args.source, *args.sources]
    if not sources:
        raise SystemExit("error: vitrail ingest needs --source (repeatable) or --sources")
    if len(sources) == 1 or len(args.labels) > 1:
        if len(args.labels) > 1 and len(args.labels) != len(sources):
            raise SystemExit(f"error: {len(args.labels)} --labels for {len(sources)} sources: give one shared "
                             "file or one per source")
        if len(sources) == 1:
            return {"source": sources[0], "labels": args.labels[0] if args.labels else None}
        return {"sources": sources, "source_labels": args.labels}
    return {"sources": sources, "labels": args.labels[0] if args.labels else None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitrail", description="Validated, compressed specialist ViTs for "
                                     "Earth observation and medical imaging, as Prefect flows tracked in MLflow.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("demo", help="run the whole pipeline on the shipped demo data",
                         description="Build the demo dataset, fine-tune, compress, validate, promote and predict.")
    _domain_arg(p)
    _workdir_arg(p, "vitrail-demo")
    p.add_argument("--epochs", type=int, help="training epochs (default: the preset's; 12 for the demo preset)")
    _preset_arg(p, "demo")

    p = verbs.add_parser("presets", help="list the named pipeline presets, or print one's parameters",
                         description="List the presets `vitrail pipeline --preset NAME` and `vitrail demo --preset "
                                     "NAME` accept; with a NAME, print that preset's parameters as JSON.")
    p.add_argument("name", nargs="?", choices=list(PRESETS), metavar="NAME", help="preset to print")

    p = verbs.add_parser("backbones", help="list the catalog of named foundation backbones (UNI, SSL4EO, RAD-DINO, ...)",
                         description="List the named backbones `--set backbone.name=NAME` accepts, with their domain, "
                                     "builder, input size, bands, embedding, licence and hub id; with a NAME, print "
                                     "that entry as JSON (bands, preprocessing, sha256, key layout).")
    p.add_argument("name", nargs="?", metavar="NAME", help="catalog entry to print")

    verbs.add_parser("domains", help="list the registered imaging domains",
                     description="List the registered imaging domains with their task and intended use.")

    p = verbs.add_parser("ingest", help="turn a source and labels into a dataset",
                         description="Read a scene, tile it, split by spatial block and write a versioned dataset.")
    _domain_arg(p)
    p.add_argument("--source", action="append", default=[], help=SOURCE_HELP + "; repeat it for several sources "
                   "(each read on its own and checkpointed, so a rerun after a crash reads only the unfinished ones)")
    p.add_argument("--sources", nargs="+", default=[], metavar="SOURCE", help="several sources at once (e.g. a "
                   "shell glob), added to any --source")
    p.add_argument("--labels", action="append", default=[], help=LABELS_HELP + "; omit for an unlabelled dataset. "
                   "With several sources: once for a file shared by all (a findings CSV), or once per source in "
                   "the same order")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--task-runner", choices=("local", "dask"), default="local",
                   help="where the sources are read: threads here (local) or a Dask cluster (default: %(default)s)")
    p.add_argument("--dask-address", default="", help="Dask scheduler address (tcp://host:8786); omit to start a "
                   "temporary Dask cluster on this machine")
    _source_args(p)
    _overrides_arg(p)

    p = verbs.add_parser("finetune", help="fine-tune a backbone with an adapter (LoRA by default) on a dataset",
                         description="Fine-tune a timm ViT with the adapter method set by adapter.method (LoRA by "
                                     "default; the peft families, BitFit, SSF, VPT, AdaptFormer, DVPT, full, "
                                     "linear-probe); logs the run and model to MLflow.")
    _domain_arg(p)
    p.add_argument("--dataset", required=True, help="dataset folder written by `vitrail ingest`")
    _workdir_arg(p)
    _overrides_arg(p)

    p = verbs.add_parser("pretrain", help="pretrain a foundation ViT on a dataset's unlabelled tiles (masked autoencoder)",
                         description="Masked-autoencoder pretraining on every tile outside the test and validation "
                                     "splits; exports the encoder (safetensors + JSON) and registers it as "
                                     "foundation-<domain> with the alias candidate.")
    _domain_arg(p)
    p.add_argument("--dataset", required=True, help="dataset folder written by `vitrail ingest`")
    _workdir_arg(p)
    p.add_argument("--preset", choices=list(PRETRAIN_PRESETS), metavar="NAME",
                   help=f"named parameter set: {', '.join(PRETRAIN_PRESETS)}; --set overrides its values")
    _overrides_arg(p, OVERRIDE_HELP.replace("adapter.method=dora", "mae.mask_ratio=0.9"))

    p = verbs.add_parser("probe", help="score backbones' frozen features (kNN, linear, few-shot, label fractions)",
                         description="Score backbones on a labelled dataset beside random init, random convolutional "
                                     "features and per-channel statistics; writes a long-format table with bootstrap "
                                     "95% intervals and a label-fraction plot, logged to MLflow. Without --model or "
                                     "--backbone it scores models:/foundation-<domain>@candidate.")
    _domain_arg(p)
    p.add_argument("--dataset", required=True, help="labelled dataset folder written by `vitrail ingest`")
    p.add_argument("--model", action="append", default=[], metavar="[LABEL=]URI",
                   help="registered encoder to score, e.g. models:/foundation-satellite@candidate (repeatable)")
    p.add_argument("--backbone", action="append", default=[], metavar="[LABEL=]NAME",
                   help="catalog entry or timm name, scored with random weights (repeatable)")
    p.add_argument("--promote", action="store_true", help="move champion to each registered encoder whose probe "
                                                          "beats random init (95%% interval above zero)")
    _workdir_arg(p)
    _overrides_arg(p, OVERRIDE_HELP.replace("adapter.method=dora", "settings.shots=[1,5]"))

    p = verbs.add_parser("compress", help="export ONNX, quantize int8 and measure variants",
                         description="Export the reference model to ONNX, check parity, quantize, measure.")
    _domain_arg(p)
    p.add_argument("--dataset", required=True, help="dataset folder (test split and calibration tiles)")
    p.add_argument("--model", required=True, help="reference model URI printed by `vitrail finetune`")
    _workdir_arg(p)
    _overrides_arg(p)

    p = verbs.add_parser("validate", help="score the reference model and its variants on the test split",
                         description="The task's metrics and plots (confusion matrices, ROC curves, IoU) for every variant.")
    _domain_arg(p)
    p.add_argument("--dataset", required=True, help="dataset folder")
    p.add_argument("--model", required=True, help="reference model URI")
    p.add_argument("--compress-run", required=True, help="MLflow run id printed by `vitrail compress`")
    _workdir_arg(p)

    p = verbs.add_parser("promote", help="gate a candidate and register it",
                         description="Apply the promotion gate and set champion/challenger aliases.")
    _domain_arg(p)
    p.add_argument("--model", required=True, help="reference model URI")
    p.add_argument("--edge-model", required=True, help="edge model URI printed by `vitrail compress`")
    p.add_argument("--compress-run", required=True, help="compress run id")
    p.add_argument("--validate-run", required=True, help="validate run id")
    _workdir_arg(p)
    _overrides_arg(p, OVERRIDE_HELP + " (gate.*)")

    p = verbs.add_parser("merge", help="merge registered fine-tunes of one base into one gated model",
                         description="Merge fine-tunes of one base (uniform/greedy soup, task arithmetic, TIES, DARE, "
                                     "OPCM, Frank-Wolfe), score each merged model on every constituent's test split, "
                                     "gate it against the constituent's own score and register it with its lineage; "
                                     "or, with --arriving, fold one new fine-tune into the running OPCM merge.")
    _domain_arg(p)
    p.add_argument("--models", type=_csv, default=[], help="fine-tunes, comma-separated: models:/NAME/VERSION, "
                   "models:/NAME@ALIAS, NAME (newest version), NAME/VERSION, NAME@ALIAS or runs:/RUN/model")
    p.add_argument("--tag", default="", help="also every registered version with this tag, KEY=VALUE")
    p.add_argument("--search", default="", help="also every registered version an MLflow filter finds, e.g. "
                   "\"name LIKE 'satellite-%%'\"")
    p.add_argument("--method", default="ties", help="uniform-soup, greedy-soup, task-arithmetic, ties, dare, opcm, "
                   "fw, several comma-separated, or all (one merge each; default: %(default)s)")
    p.add_argument("--arriving", default="", help="a newly registered fine-tune (models:/NAME/VERSION) to fold into "
                   "the running OPCM merge instead")
    p.add_argument("--no-compress", action="store_true", help="register the merged models without compressing "
                   "and validating them")
    _workdir_arg(p)
    _overrides_arg(p, OVERRIDE_HELP.replace("train.epochs=3 --set adapter.method=dora",
                                            "merge.density=0.3 --set gate.min_share=0.95"))

    p = verbs.add_parser("rollback", help="move champion back to an earlier version (reference and edge together)",
                         description="Restore an earlier champion on the reference and edge models together and "
                                     "tag the move; --set approval.required=true pauses for a reviewer first.")
    p.add_argument("--model", required=True, help="registered model name, reference or edge")
    p.add_argument("--to", dest="to_version", help="version of that model to restore (default: the previous champion)")
    p.add_argument("--reason", default="", help="why; recorded on the model versions")
    p.add_argument("--by", default=os.environ.get("USER", ""), help="who asks; recorded (default: $USER)")
    _workdir_arg(p)
    _overrides_arg(p, OVERRIDE_HELP + " (approval.*)")

    p = verbs.add_parser("lineage", help="print the chain behind a registered model version",
                         description="Dataset digest and sources, code commit, parameters, MLflow runs and Prefect "
                                     "flow runs, parent model and foundation backbone, compression recipe, gate "
                                     "results and approvals of a registered version, from what the registry and its "
                                     "runs recorded.")
    p.add_argument("model_uri", metavar="MODEL_URI", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--json", action="store_true", help="print JSON (for machines)")
    _workdir_arg(p)

    p = verbs.add_parser("relay", help="relay MLflow registry webhooks to Prefect events (deployment triggers)",
                         description="Serve POST /mlflow/webhook: check each delivery's HMAC signature, timestamp "
                                     "and delivery id (replays refused) with $VITRAIL_WEBHOOK_SECRET, and emit a "
                                     "Prefect event to $PREFECT_API_URL that deploy/prefect.yaml's triggers match.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8787, help="port (default: %(default)s)")
    p.add_argument("--register-url", metavar="URL",
                   help="first create or update the MLflow webhook (on $MLFLOW_TRACKING_URI) that delivers to URL, "
                        "the relay's address as the MLflow server reaches it, e.g. http://relay:8787/mlflow/webhook")

    p = verbs.add_parser("predict", help="predict a scene (or a drop folder) with a model",
                         description="Write a prediction GeoTIFF with the input's CRS and transform.")
    _domain_arg(p)
    p.add_argument("--model", help="MLflow model URI (default: models:/<domain>-<task>-edge@champion)")
    p.add_argument("--input", required=True, help="scene folder, multi-band GeoTIFF, or a drop folder of scenes")
    p.add_argument("--output", required=True, help="output .tif for one scene, or a folder for a drop folder")
    p.add_argument("--stride", type=int, help="tile step in pixels (default: the model's tile size)")
    p.add_argument("--task-runner", choices=("none", "local", "dask"), default="none",
                   help="a drop folder's scenes as one task each, on threads here (local) or a Dask cluster; "
                   "none predicts them in one task (default: %(default)s)")
    p.add_argument("--dask-address", default="", help="Dask scheduler address (tcp://host:8786); omit to start a "
                   "temporary Dask cluster on this machine")
    _mpp_arg(p)
    p.add_argument("--screen-ppmm", type=float, help="hyperspectral plume models: segment only tiles whose methane "
                   "enhancement (3 x 3 mean) exceeds this many ppm·m, the rest being background (the on-board "
                   "cascade; 400 suits the demo); default: every tile")
    _workdir_arg(p)

    p = verbs.add_parser("pipeline", help="ingest, fine-tune, compress, validate, promote and predict",
                         description="Run every stage in order on one source and its labels.")
    _domain_arg(p)
    p.add_argument("--source", required=True, help=SOURCE_HELP)
    p.add_argument("--labels", required=True, help=LABELS_HELP)
    _workdir_arg(p)
    _source_args(p)
    p.add_argument("--epochs", type=int, help="training epochs")
    _preset_arg(p, None)
    _overrides_arg(p)
    p = verbs.add_parser("dataset", help="inspect a dataset (verify every chunk against its digest)",
                         description="Work on a written dataset, at a local folder or an fsspec URL (s3://...).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("verify", help="check the manifest and every chunk against the dataset digest",
                               description="Read every chunk and the manifest of a dataset and check them against "
                                           "their digests; print one line, or exit 2 naming the first problem.")
    check.add_argument("location", metavar="DIR_OR_URL", help="dataset folder or URL (e.g. s3://bucket/prefix)")

    p = verbs.add_parser("bench", help="run a benchmark side by side and write DIR/bench/NAME.json",
                         description="Benchmarks measure variants side by side in one run on this machine and "
                                     "print ratios; they are not tests. Known: compression, ingest, merging, onboard, "
                                     "peft, pretraining, train, wsi.")
    p.add_argument("name", help="benchmark name (compression, ingest, merging, onboard, peft, pretraining, train, wsi)")
    _workdir_arg(p)
    _overrides_arg(p, "benchmark option, e.g. --set repeats=50 (see the benchmark's docs)")
    return parser


def _print_receipt(receipt) -> None:
    print(json.dumps(receipt.model_dump(mode="json"), indent=2))


def _demo_summary(receipt, workdir: Path) -> str:
    from tasks.dataset import read_dataset_info
    from tasks.evaluation import PRIMARY_METRICS
    from tasks.promotion import AUTO_GATE_METRIC
    from tasks.tracking import resolve_tracking_uri

    compress = json.loads(Path(receipt.compress.report).read_text())
    task = read_dataset_info(receipt.ingest.dataset).task
    metric, judged_on = PRIMARY_METRICS[task], AUTO_GATE_METRIC[task]
    from tasks.bags import SLIDE_TASK

    slides = receipt.validation.task == SLIDE_TASK  # a slide model: scores are per slide
    if slides:
        metric, judged_on = "slide accuracy", AUTO_GATE_METRIC[receipt.validation.task]
    auroc = receipt.validation.metrics
    rows = "\n".join(f"    {v['name']:<18} {metric} {v['accuracy']:.3f}  p50 {v['latency_ms_p50']:7.2f} ms  "
                     f"{v['throughput']:8.1f} {'bags' if slides else 'img'}/s  {v['size_bytes'] / 1e6:6.2f} MB  "
                     f"x{v['speedup_vs_fp32']:.2f}"
                     + (f"  slide AUROC {auroc[v['name'] + '.test_macro_auroc']:.3f}"
                        if slides and f"{v['name']}.test_macro_auroc" in auroc else "")
                     for v in compress["variants"])
    promoted = receipt.promote
    verdict = f"promoted to {promoted.alias}" if promoted.alias else "NOT promoted (gate failed)"
    outputs = receipt.predict.outputs if receipt.predict else []
    predictions = ", ".join(outputs) if len(outputs) <= 3 else \
        f"{len(outputs)} files in {Path(outputs[0]).parent} (e.g. {Path(outputs[0]).name})"
    uri = resolve_tracking_uri(workdir)
    # A preset may name the edge variant instead of letting 'auto' pick it.
    edge_reason = (f"fastest variant within the {judged_on} budget on the validation split"
                   if compress.get("selection", {}).get("mode", "auto") == "auto" else "named by the parameters")
    return f"""
Vitrail demo finished.
  dataset        {receipt.ingest.dataset}  (digest {receipt.ingest.digest[:12]})
  variants (test split {metric}, batch-1 latency on {compress['threads']} threads):
{rows}
  int8 / fp32 latency ratio  {compress['int8_vs_fp32_latency_ratio']:.3f} (static int8 vs torch fp32 eager, batch 1)
  edge artifact  {compress['edge_variant']} ({edge_reason})
  promotion      {promoted.edge_model} and {promoted.reference_model}: {verdict}
  prediction     {predictions}
  report         {receipt.compress.report}

Look at it:
  MLflow UI   mlflow ui --backend-store-uri {uri} --port 5000   then open http://127.0.0.1:5000
  Prefect UI  prefect server start --host 127.0.0.1              then open http://127.0.0.1:4200
              (the demo ran on Prefect's ephemeral server, which keeps its runs in the same local database)
"""


def pipeline_payload(args: argparse.Namespace) -> dict:
    """The pipeline's parameters from a parsed command line: the preset, then explicit flags, then --set."""
    payload = {"domain": args.domain, "source": args.source, "labels": args.labels, "workdir": args.workdir,
               **_source_payload(args)}
    if args.epochs is not None:
        payload["train"] = {"epochs": args.epochs}
    return _apply_overrides(apply_preset(args.preset, payload), args.set)


def probe_payload(args: argparse.Namespace) -> dict:
    """The probe's parameters from --model/--backbone (LABEL=VALUE or VALUE, labelled by position)."""
    def split(item: str, default: str) -> tuple[str, str]:
        label, sep, value = item.partition("=")
        return (label, value) if sep and "/" not in label and ":" not in label else (default, item)

    backbones = []
    for n, item in enumerate(args.model):
        label, uri = split(item, "foundation" if n == 0 else f"model-{n + 1}")
        backbones.append({"label": label, "model_uri": uri})
    for n, item in enumerate(args.backbone):
        label, name = split(item, name_label(item))
        backbones.append({"label": label, "backbone": {"name": name}})
    payload = {"domain": args.domain, "dataset": args.dataset, "workdir": args.workdir, "promote": args.promote}
    if backbones:  # else the flow scores models:/foundation-<domain>@candidate
        payload["backbones"] = backbones
    return payload


def name_label(name: str) -> str:
    """A table label from a backbone name (letters, digits, . _ + - only)."""
    return "".join(c if c.isalnum() or c in "._+-" else "-" for c in name)[:60]


def run(args: argparse.Namespace) -> int:
    if args.verb == "domains":
        from domains import registry

        for name, spec in registry().items():
            print(f"{name:<14} {spec.task:<15} {spec.title}\n{'':<14} {spec.intended_use}")
        return 0
    if args.verb == "presets":
        if args.name:
            print(json.dumps(PRESETS[args.name].params, indent=2))
        else:
            for preset in PRESETS.values():
                print(f"{preset.name:<14} {preset.description}")
        return 0
    if args.verb == "backbones":
        from tasks.backbone_catalog import catalog_table, describe_entry, get_entry

        print(json.dumps(describe_entry(get_entry(args.name)), indent=2) if args.name else catalog_table())
        return 0
    overrides = getattr(args, "set", [])
    if args.verb == "demo":
        from flows.demo import DemoParams, demo

        workdir = Path(args.workdir)
        epochs = {} if args.epochs is None else {"epochs": args.epochs}
        if args.preset == "demo":
            receipt = demo(DemoParams(domain=args.domain, workdir=str(workdir), **epochs))
        else:
            # Another preset on the same demo inputs: the pipeline flow with that preset's parameters.
            from flows.pipeline import PipelineParams, pipeline
            from tasks.demo import prepare_demo_inputs

            inputs = prepare_demo_inputs(args.domain, workdir / "demo-data")
            payload = {"domain": args.domain, **inputs, "workdir": str(workdir), "train": epochs}
            receipt = pipeline(PipelineParams(**apply_preset(args.preset, payload)))
        print(_demo_summary(receipt, workdir))
        return 0 if receipt.promote.alias == "champion" or receipt.promote.passed else 1
    if args.verb == "ingest":
        from flows.ingest import IngestParams, ingest_dataset

        payload = {"domain": args.domain, "out": args.out, **_ingest_sources_payload(args), **_source_payload(args),
                   "runner": {"kind": args.task_runner, "address": args.dask_address}}
        _print_receipt(ingest_dataset(IngestParams(**_apply_overrides(payload, overrides))))
        return 0
    if args.verb == "finetune":
        from flows.finetune import FinetuneParams, finetune_backbone

        payload = {"domain": args.domain, "dataset": args.dataset, "workdir": args.workdir}
        _print_receipt(finetune_backbone(FinetuneParams(**_apply_overrides(payload, overrides))))
        return 0
    if args.verb == "pretrain":
        from flows.pretrain import PretrainParams, pretrain

        payload = apply_pretrain_preset(args.preset, {"domain": args.domain, "dataset": args.dataset,
                                                      "workdir": args.workdir})
        _print_receipt(pretrain(PretrainParams(**_apply_overrides(payload, overrides))))
        return 0
    if args.verb == "probe":
        from flows.probe import ProbeParams, probe

        _print_receipt(probe(ProbeParams(**_apply_overrides(probe_payload(args), overrides))))
        return 0
    if args.verb == "compress":
        from flows.compress import CompressFlowParams, compress

        payload = {"domain": args.domain, "dataset": args.dataset, "model_uri": args.model, "workdir": args.workdir}
        _print_receipt(compress(CompressFlowParams(**_apply_overrides(payload, overrides))))
        return 0
    if args.verb == "validate":
        from flows.validate import ValidateParams, validate

        _print_receipt(validate(ValidateParams(domain=args.domain, dataset=args.dataset, model_uri=args.model,
                                               compress_run_id=args.compress_run, workdir=args.workdir)))
        return 0
    if args.verb == "promote":
        from flows.promote import PromoteParams, promote

        payload = {"domain": args.domain, "model_uri": args.model, "edge_model_uri": args.edge_model,
                   "compress_run_id": args.compress_run, "validate_run_id": args.validate_run, "workdir": args.workdir}
        receipt = promote(PromoteParams(**_apply_overrides(payload, overrides)))
        _print_receipt(receipt)
        return 0 if receipt.passed else 1
    if args.verb == "merge":
        from flows.merge import MergeFlowParams, merge
        from tasks.merging import METHODS

        methods = list(METHODS) if args.method == "all" else _csv(args.method)
        passed = True
        for method in methods:
            payload = {"domain": args.domain, "workdir": args.workdir, "arriving": args.arriving,
                       "selection": {"models": args.models, "tag": args.tag, "search": args.search},
                       "merge": {"method": method}, "compress": not args.no_compress}
            receipt = merge(MergeFlowParams(**_apply_overrides(payload, overrides)))
            _print_receipt(receipt)
            passed = passed and receipt.gate_passed
        return 0 if passed else 1
    if args.verb == "rollback":
        from flows.rollback import RollbackParams, rollback

        payload = {"model": args.model, "to_version": args.to_version, "reason": args.reason,
                   "requested_by": args.by, "workdir": args.workdir}
        receipt = rollback(RollbackParams(**_apply_overrides(payload, overrides)))
        _print_receipt(receipt)
        return 0 if receipt.rolled_back else 1
    if args.verb == "lineage":
        from tasks.lineage import format_lineage, model_lineage
        from tasks.tracking import configure_tracking

        configure_tracking(args.workdir)
        lineage = model_lineage(args.model_uri)
        print(json.dumps(lineage, indent=2) if args.json else format_lineage(lineage))
        return 0
    if args.verb == "relay":
        import uvicorn

        from tasks.registry_events import SECRET_ENV, create_relay_app, register_webhook

        app = create_relay_app()  # refuses to start without the secret
        if args.register_url:
            print(f"MLflow webhook {register_webhook(args.register_url, os.environ[SECRET_ENV])} -> {args.register_url}")
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
        return 0
    if args.verb == "predict":
        from flows.predict import PredictParams, predict

        receipt = predict(PredictParams(domain=args.domain, model_uri=args.model, input=args.input,
                                        output=args.output, stride=args.stride, workdir=args.workdir,
                                        mpp=args.mpp, screen_ppmm=args.screen_ppmm,
                                        runner=None if args.task_runner == "none" else
                                        {"kind": args.task_runner, "address": args.dask_address}))
        _print_receipt(receipt)
        return 1 if receipt.failed else 0
    if args.verb == "pipeline":
        from flows.pipeline import PipelineParams, pipeline

        receipt = pipeline(PipelineParams(**pipeline_payload(args)))
        _print_receipt(receipt)
        return 0
    if args.verb == "dataset":
        from tasks.dataset import verify_dataset

        print(verify_dataset(args.location).line())
        return 0
    if args.verb == "bench":
        from tasks.benchmarks import load_benchmark

        benchmark = load_benchmark(args.name)
        # Benchmarks run for minutes: what they are building and measuring goes to stderr as they go.
        progress = logging.StreamHandler()
        progress.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        progress_log = logging.getLogger("tasks")
        progress_log.addHandler(progress)
        progress_log.setLevel(logging.INFO)
        progress_log.propagate = False  # Prefect's console handler, once imported, would print each line again
        options = dict(item.split("=", 1) for item in overrides if "=" in item)
        workdir = Path(args.workdir)
        result = benchmark.run_benchmark(workdir, options)
        out = workdir / "bench" / f"{args.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(benchmark.format_table(result))
        print(f"\nwritten: {out}")
        return 0
    raise AssertionError(f"unhandled verb {args.verb}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before Prefect is imported: it reads its settings once, at import.
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    from flows.error_reporting import INPUT_ERRORS, describe_error, install_quiet_input_errors

    install_quiet_input_errors()
    try:
        return run(args)
    except INPUT_ERRORS as error:
        # Bad input or an impossible request: one sentence, no traceback. Anything else is a bug in
        # Vitrail and propagates with its traceback.
        print(f"vitrail {args.verb}: error: {describe_error(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
