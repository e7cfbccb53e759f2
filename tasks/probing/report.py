"""The probe's outputs: the long-format CSV, the label-fraction plot, MLflow metrics, and the gate on the registry."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from tasks.atomic_files import atomic_path
from tasks.probing.scoring import LABEL_FRACTION, TABLE_COLUMNS, ProbeOutcome

TABLE_FILE = "probe-table.csv"
PLOT_FILE = "label-fraction.png"
GATE_FILE = "probe-gate.json"
CHAMPION_ALIAS = "champion"


def write_table(outcome: ProbeOutcome, path: Path) -> Path:
    """One row per (backbone, protocol, setting, metric), every column of :data:`TABLE_COLUMNS`."""
    with atomic_path(path) as partial:
        with open(partial, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS)
            writer.writeheader()
            for row in outcome.rows:
                writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def read_table(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def plot_label_fraction(outcome: ProbeOutcome, metric: str, path: Path) -> Path:
    """The linear probe's test score against the share of training labels, one line per backbone, 95% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.5, 4.2))
    backbones = list(dict.fromkeys(r["backbone"] for r in outcome.rows if r["protocol"] == LABEL_FRACTION))
    for backbone in backbones:
        points = sorted((float(r["setting"].removeprefix("labels=").rstrip("%")), r["value"], r["ci95_low"],
                         r["ci95_high"]) for r in outcome.rows
                        if r["backbone"] == backbone and r["protocol"] == LABEL_FRACTION and r["metric"] == metric)
        if not points:
            continue
        x, y, low, high = zip(*points)
        line, = axis.plot(x, y, marker="o", label=backbone)
        axis.fill_between(x, low, high, alpha=0.15, color=line.get_color())
    axis.set(xscale="log", xlabel="training labels used (%)", ylabel=f"test {metric.replace('_', ' ')}",
             title=f"linear probe vs label fraction ({outcome.target})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=110, format="png")
    plt.close(fig)
    return path


def metric_key(*parts: str) -> str:
    """An MLflow metric name from table fields (MLflow allows letters, digits, _ - . / and spaces)."""
    return ".".join(re.sub(r"[^A-Za-z0-9_\-/]", "_", p.replace("=", "_").replace("%", "pct")) for p in parts)


def probe_metrics(outcome: ProbeOutcome) -> dict[str, float]:
    """Flat metrics: ``<backbone>.<protocol>.<setting>.<metric>`` (and its ``_ci95_low``/``_ci95_high``), plus
    ``gate.<backbone>.difference``/``ci95_low``/``passed``, which the promotion gate reads."""
    metrics: dict[str, float] = {}
    for row in outcome.rows:
        setting = "full" if row["protocol"] == "linear" else row["setting"]
        key = metric_key(row["backbone"], row["protocol"], setting, row["metric"])
        metrics[key] = row["value"]
        metrics[f"{key}_ci95_low"] = row["ci95_low"]
        metrics[f"{key}_ci95_high"] = row["ci95_high"]
    for backbone, record in outcome.gate.items():
        base = metric_key("gate", backbone)
        metrics.update({f"{base}.difference": record["difference"], f"{base}.ci95_low": record["ci95_low"],
                        f"{base}.ci95_high": record["ci95_high"], f"{base}.passed": float(record["passed"])})
    return metrics


def write_outputs(outcome: ProbeOutcome, metric: str, out_dir: Path) -> dict[str, Path]:
    """The table, the plot and the gate record in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gate = out_dir / GATE_FILE
    with atomic_path(gate) as partial:
        Path(partial).write_text(json.dumps({"target": outcome.target, "dataset_digest": outcome.dataset_digest,
                                             "gate": outcome.gate}, indent=2))
    return {"table": write_table(outcome, out_dir / TABLE_FILE),
            "plot": plot_label_fraction(outcome, metric, out_dir / PLOT_FILE), "gate": gate}


def record_probe(outcome: ProbeOutcome, files: dict[str, Path]) -> dict[str, float]:
    """Log the metrics and files to the active MLflow run; returns the metrics."""
    from tasks import tracking

    metrics = probe_metrics(outcome)
    tracking.log_metrics(metrics)
    for path in files.values():
        tracking.log_artifact(path, "probe")
    tracking.set_tags({"vitrail.probe_target": outcome.target,
                       "vitrail.probe_adapted": ",".join(sorted({r["backbone"] for r in outcome.rows
                                                                 if r["adapted"] is True})) or "none"})
    return metrics


def apply_probe_gate(record: dict, registered_name: str, version: str, run_id: str) -> str | None:
    """Tag the registered version with the gate's verdict; move ``champion`` to it only when it passed.

    Returns the alias set (``champion``) or None.
    """
    from tasks import tracking

    tags = {"vitrail.probe_gate": "passed" if record["passed"] else "failed",
            "vitrail.probe_gate_reason": record["reason"], "vitrail.probe_run_id": run_id,
            f"vitrail.probe_{record['metric']}_vs_random_init": f"{record['difference']:.6f}",
            f"vitrail.probe_{record['metric']}_vs_random_init_ci95_low": f"{record['ci95_low']:.6f}"}
    tracking.tag_version(registered_name, version, tags)
    if not record["passed"]:
        return None
    tracking.set_alias(registered_name, CHAMPION_ALIAS, version)
    return CHAMPION_ALIAS


write_outputs_task = task(write_outputs, name="write-probe-outputs", cache_policy=NONE)
record_probe_task = task(record_probe, name="record-probe", cache_policy=NONE)
apply_probe_gate_task = task(apply_probe_gate, name="apply-probe-gate", cache_policy=NONE)


def registered_version(model_uri: str) -> tuple[str, str] | None:
    """``(name, version)`` a ``models:/name@alias`` or ``models:/name/version`` URI points at now, else None."""
    from tasks import tracking

    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model_uri)
    if match is None:
        return None
    name, alias, version = match.groups()
    if version:
        return name, version
    holder = tracking.alias_holder(name, alias)
    return (name, holder[0]) if holder else None


def gate_registered_subjects(outcome: ProbeOutcome, model_uris: dict[str, str], run_id: str) -> dict[str, str]:
    """Apply the probe gate to every registered subject (label -> model URI); returns label -> verdict."""
    verdicts = {}
    for label, uri in model_uris.items():
        target = registered_version(uri) if uri else None
        if target is None or label not in outcome.gate:
            continue
        alias = apply_probe_gate(outcome.gate[label], target[0], target[1], run_id)
        verdicts[label] = f"{target[0]}/{target[1]}: " + (f"promoted to {alias}" if alias else "kept as candidate")
    return verdicts


def probe_gate_candidate(dataset_path: Path | str, description_file: Path, settings, registered_name: str,
                         version: str, run_id: str, out_dir: Path) -> tuple[str, str | None, str]:
    """The pretrain stage's probe gate: probe the exported encoder on the dataset beside the baselines, record
    the table and metrics in the active run, tag the registered version, and move ``champion`` to it when it
    passed. Returns ``(verdict, alias set or None, table path)``; the verdict is "skipped" without labels.
    """
    from tasks.dataset import read_dataset_info
    from tasks.probing.embeddings import ProbeSubject
    from tasks.probing.scoring import probe_backbones

    counts = read_dataset_info(dataset_path).split_counts
    if not counts.get("train") or not counts.get("test"):
        return "skipped", None, ""
    outcome = probe_backbones(dataset_path, [ProbeSubject(label="candidate", model_uri=str(description_file))],
                              settings, None)
    files = write_outputs(outcome, settings.gate_metric, out_dir)
    record_probe(outcome, files)
    record = outcome.gate["candidate"]
    alias = apply_probe_gate(record, registered_name, version, run_id)
    return ("passed" if record["passed"] else "failed"), alias, str(files["table"])


probe_gate_candidate_task = task(probe_gate_candidate, name="probe-gate-candidate", cache_policy=NONE)
gate_registered_subjects_task = task(gate_registered_subjects, name="gate-registered-subjects", cache_policy=NONE)
