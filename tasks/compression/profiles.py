"""Target hardware profiles: budgets a deployable variant must meet, and how it would run there.

Each profile names the edge runtimes its device has (``runtimes``): the compress stage builds every
variant for each of them and the edge choice picks runtime and variant together. Only ``cpu-2core`` is *measured* (it is the machine running the flow, limited to 2 threads). The edge
profiles are *declared*: their budgets and execution provider come from vendor data, nothing is
timed on them, and the report says so. For a declared profile the latency figures in the report are
this machine's, and only the size budget and the precisions the target supports are checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from tasks.request_errors import RequestError

ProfileName = Literal["cpu-2core", "arm-a76-4core", "jetson-orin-nano"]


class ProfileError(RequestError):
    """Unknown profile, or a budget no variant can meet."""


@dataclass(frozen=True)
class TargetProfile:
    """One deployment target and its budgets."""

    name: str
    description: str
    measured: bool
    execution_provider: str
    threads: int
    latency_budget_ms: float
    memory_budget_mb: float
    size_budget_mb: float
    precisions: tuple[str, ...]
    runtimes: tuple[str, ...] = ("onnxruntime",)
    """Edge runtimes the device has: every variant is built and measured on each of them, and the edge
    choice picks a (runtime, variant) pair among them."""

    def as_dict(self) -> dict:
        note = ("measured on the machine running the flow" if self.measured else
                "declared, not measured: latencies in this report come from the machine running the flow; "
                "only the size budget and supported precisions are checked")
        return {**asdict(self), "precisions": list(self.precisions), "runtimes": list(self.runtimes), "note": note}


PROFILES: dict[str, TargetProfile] = {p.name: p for p in (
    TargetProfile("cpu-2core", "Two x86-64 cores (the machine running the flow, 2 threads)", True,
                  "CPUExecutionProvider", 2, latency_budget_ms=50.0, memory_budget_mb=2048.0, size_budget_mb=500.0,
                  precisions=("fp32", "int8", "int8-dynamic", "fp16", "bf16"), runtimes=("onnxruntime", "openvino")),
    TargetProfile("arm-a76-4core", "4x Cortex-A76 (Raspberry Pi 5 class on-board computer)", False,
                  "XnnpackExecutionProvider", 4, latency_budget_ms=100.0, memory_budget_mb=1024.0,
                  size_budget_mb=50.0, precisions=("fp32", "int8", "int8-dynamic", "fp16"),
                  # OpenVINO's ARM CPU plugin runs on Cortex-A76 too; not measured here.
                  runtimes=("onnxruntime", "openvino")),
    TargetProfile("jetson-orin-nano", "NVIDIA Jetson Orin Nano 8 GB (Ampere GPU, TensorRT)", False,
                  "TensorrtExecutionProvider", 6, latency_budget_ms=20.0, memory_budget_mb=2048.0,
                  size_budget_mb=200.0, precisions=("fp32", "int8", "fp16")),
)}


def get_profile(name: str) -> TargetProfile:
    """The profile called ``name``; an unknown name is an error listing the known ones."""
    if name not in PROFILES:
        raise ProfileError(f"unknown target profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}")
    return PROFILES[name]


def budget_violations(profile: TargetProfile, precision: str, latency_ms: float, memory_bytes: int | None,
                      size_bytes: int, runtime: str = "onnxruntime") -> list[str]:
    """Why a variant does not fit ``profile`` (empty when it does)."""
    problems = []
    if runtime not in profile.runtimes:
        problems.append(f"runtime {runtime} not on {profile.name} (has {', '.join(profile.runtimes)})")
    if precision not in profile.precisions:
        problems.append(f"{precision} not supported by {profile.execution_provider}")
    if size_bytes > profile.size_budget_mb * 1e6:
        problems.append(f"size {size_bytes / 1e6:.1f} MB > {profile.size_budget_mb:g} MB")
    if profile.measured:
        if latency_ms > profile.latency_budget_ms:
            problems.append(f"p50 {latency_ms:.2f} ms per tile > {profile.latency_budget_ms:g} ms")
        if memory_bytes is not None and memory_bytes > profile.memory_budget_mb * 1e6:
            problems.append(f"memory {memory_bytes / 1e6:.0f} MB > {profile.memory_budget_mb:g} MB")
    return problems
