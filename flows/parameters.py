"""Field types shared by the flows' parameter models (what the Prefect UI renders as forms)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, WithJsonSchema

from domains import domain_names, get_domain


def _known_domain(name: str) -> str:
    get_domain(name)  # raises with the list of known domains
    return name


# A plain string validated against the registry, rendered as a dropdown of registered domains. An
# explicit enum schema (not Literal) avoids the single-option "const" schema the Prefect UI mishandles.
DomainName = Annotated[
    str,
    AfterValidator(_known_domain),
    WithJsonSchema({"type": "string", "enum": domain_names(), "title": "Domain",
                    "description": "Imaging domain (from the domain registry)"}),
    Field(description="Imaging domain (from the domain registry)"),
]

WorkdirField = Field("vitrail-work", min_length=1, max_length=1000,
                     description="Work folder: checkpoints, reports, predictions, and the local MLflow store "
                                 "when MLFLOW_TRACKING_URI is not set")
