"""Demo inputs: each domain writes its own small, documented demo source and labels."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from domains import get_domain
from tasks.request_errors import RequestError


def prepare_demo_inputs(domain_name: str, folder: Path) -> dict[str, str]:
    """Write the domain's demo inputs into ``folder``; return their paths by role (source, labels)."""
    domain = get_domain(domain_name)
    if domain.prepare_demo is None:
        raise RequestError(f"domain {domain_name!r} has no demo")
    folder.mkdir(parents=True, exist_ok=True)
    return {role: str(path) for role, path in domain.prepare_demo(folder).items()}


prepare_demo_inputs_task = task(prepare_demo_inputs, name="prepare-demo-inputs", cache_policy=NONE)
