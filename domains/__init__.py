"""Registry of imaging domains: every sub-package of ``domains`` that exports a ``SPEC``.

Adding a domain is adding a folder; nothing else lists them. Discovery imports only each domain's
``__init__`` (format readers are imported inside the functions that use them), so this stays light.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from domains.spec import (
    Channel,
    CoarseGrid,
    CoarsePatches,
    DomainInputError,
    LABEL_RANKS,
    DomainSpec,
    IngestRequest,
    PredictionRequest,
    PredictionSummary,
    SampleSet,
    Scaling,
    TaskType,
    WindowChannel,
    Windows,
    apply_windows,
    convert_units,
    labelled_samples,
    same_scaling,
)

__all__ = [
    "Channel",
    "CoarseGrid",
    "CoarsePatches",
    "DomainInputError",
    "DomainSpec",
    "LABEL_RANKS",
    "IngestRequest",
    "PredictionRequest",
    "PredictionSummary",
    "SampleSet",
    "Scaling",
    "convert_units",
    "same_scaling",
    "TaskType",
    "WindowChannel",
    "Windows",
    "apply_windows",
    "labelled_samples",
    "domain_names",
    "get_domain",
    "registry",
]


class DomainRegistryError(RuntimeError):
    """A domain package is malformed (no SPEC, wrong type, name mismatch)."""


def _check_spec(package: str, spec: object) -> DomainSpec:
    if not isinstance(spec, DomainSpec):
        raise DomainRegistryError(f"domains.{package}.SPEC must be a DomainSpec, got {type(spec).__name__}")
    if spec.name != package:
        raise DomainRegistryError(f"domains.{package}.SPEC.name is {spec.name!r}; it must equal the folder name")
    if not spec.default_channels:
        raise DomainRegistryError(f"domains.{package}: default_channels is empty")
    if len(spec.default_class_names) < 2:
        raise DomainRegistryError(f"domains.{package}: a task needs at least two default classes")
    for attr in ("read_samples", "predict", "list_prediction_inputs", "write_example"):
        if not callable(getattr(spec, attr)):
            raise DomainRegistryError(f"domains.{package}.SPEC.{attr} is not callable")
    return spec


@cache
def registry() -> dict[str, DomainSpec]:
    """Import every domain sub-package once and return their specs by name."""
    found: dict[str, DomainSpec] = {}
    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg or module.name.startswith("_"):
            continue
        package = importlib.import_module(f"{__name__}.{module.name}")
        if not hasattr(package, "SPEC"):
            raise DomainRegistryError(f"domains/{module.name}/ is a package without a SPEC")
        found[module.name] = _check_spec(module.name, package.SPEC)
    if not found:
        raise DomainRegistryError("no domain packages found under domains/")
    return dict(sorted(found.items()))


def domain_names() -> list[str]:
    """Names of all registered domains, sorted."""
    return list(registry())


def get_domain(name: str) -> DomainSpec:
    """Return the spec of domain ``name``; the error lists the known domains."""
    domains = registry()
    if name not in domains:
        raise KeyError(f"unknown domain {name!r}; known domains: {', '.join(domains)}")
    return domains[name]
