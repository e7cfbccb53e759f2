"""Registry events: MLflow's model-registry webhooks, checked and relayed to Prefect as events.

MLflow (>= 3.3, a tracking server with a SQL store) POSTs a JSON body for each registry change with three
headers: ``X-MLflow-Delivery-Id`` (a UUID), ``X-MLflow-Timestamp`` (Unix seconds) and ``X-MLflow-Signature``
(``v1,<base64 HMAC-SHA256 of "<delivery id>.<timestamp>.<body>" under the webhook's secret>``; see
``mlflow/webhooks/delivery.py``). The relay accepts a delivery only when the signature matches (else 401), the
timestamp is within the allowed skew of the relay's clock (else 401: an old, captured delivery), and the delivery id
was not seen before (else 409: a replay). It then emits one Prefect event, whose id is the delivery id, so even
a replay that reached Prefect some other way is dropped by Prefect's own de-duplication of event ids.

Deployment triggers in ``deploy/prefect.yaml`` match these events by resource labels:

- ``mlflow.model_version_alias.created`` (an alias set or moved): labels ``mlflow.model``, ``mlflow.version``,
  ``mlflow.alias``;
- ``mlflow.model_version.created`` (a new version): labels ``mlflow.model``, ``mlflow.version``,
  ``mlflow.run_id`` and ``vitrail.role`` (``fine-tune``, ``edge``, ``merged`` or ``foundation``, from the model
  name and the version's tags) so that the merge flow is started only by new fine-tunes, never by its own output.

Every resource also carries ``mlflow.model_uri`` (``models:/<name>/<version>``), the URI a triggered flow takes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

# At module level: FastAPI resolves the endpoint's annotations by name in this module's globals (postponed
# annotations), and an unresolved ``Request`` would be read as a query parameter.
from fastapi import Request

from tasks.request_errors import RequestError

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
SECRET_ENV = "VITRAIL_WEBHOOK_SECRET"
MAX_SKEW_ENV = "VITRAIL_WEBHOOK_MAX_SKEW_S"
DEFAULT_MAX_SKEW_S = 300
WEBHOOK_PATH = "/mlflow/webhook"
WEBHOOK_NAME = "vitrail-relay"
RELAYED_EVENTS = ("model_version.created", "model_version_alias.created")

log = logging.getLogger(__name__)


class DeliveryRejected(Exception):
    """A delivery the relay refuses; ``status`` is the HTTP status it answers with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def sign_delivery(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's webhook signature of a delivery: ``v1,`` + base64(HMAC-SHA256(secret, id.timestamp.body))."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


@dataclass
class ReplayGuard:
    """Delivery ids seen within the time window (older ones are refused by their timestamp anyway).

    In memory: one relay process. Several replicas behind a load balancer would each accept a replay once; run
    one replica (it is a tiny service), which Prefect's de-duplication of event ids backs up.
    """

    window_s: float
    _seen: OrderedDict = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def first_time(self, delivery_id: str, now: float) -> bool:
        """Record ``delivery_id``; False when it was already seen within the window."""
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - 2 * self.window_s:
                self._seen.popitem(last=False)
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now
            return True

    def forget(self, delivery_id: str) -> None:
        """Drop ``delivery_id``: it was not relayed, so MLflow's retry of it (same id) must be accepted."""
        with self._lock:
            self._seen.pop(delivery_id, None)


def verify_delivery(headers: dict[str, str], body: bytes, secret: str, guard: ReplayGuard,
                    now: float | None = None) -> dict:
    """The delivery's JSON payload, once its signature, timestamp and delivery id pass.

    ``headers`` are matched case-insensitively. The signature is checked first (constant-time), so nothing
    about freshness or replays is revealed to a sender without the secret.

    Raises:
        DeliveryRejected: 401 for a missing or wrong signature or a timestamp outside the window, 409 for a
            delivery id seen before, 400 for a body that is not a JSON object.
    """
    now = time.time() if now is None else now
    lower = {key.lower(): value for key, value in headers.items()}
    delivery_id = lower.get(DELIVERY_ID_HEADER.lower(), "")
    timestamp = lower.get(TIMESTAMP_HEADER.lower(), "")
    signature = lower.get(SIGNATURE_HEADER.lower(), "")
    if not (delivery_id and timestamp and signature):
        raise DeliveryRejected(401, f"missing {SIGNATURE_HEADER}, {TIMESTAMP_HEADER} or {DELIVERY_ID_HEADER}")
    expected = sign_delivery(secret, delivery_id, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate.strip()) for candidate in signature.split(" ")):
        raise DeliveryRejected(401, "signature does not match")
    try:
        sent = int(timestamp)
    except ValueError as error:
        raise DeliveryRejected(401, f"timestamp {timestamp!r} is not Unix seconds") from error
    if abs(now - sent) > guard.window_s:
        raise DeliveryRejected(401, f"timestamp {sent} is {now - sent:+.0f} s from now "
                                    f"(allowed +-{guard.window_s:.0f})")
    if not guard.first_time(delivery_id, now):
        raise DeliveryRejected(409, f"delivery {delivery_id} was already received (replay)")
    try:
        payload = json.loads(body)
    except ValueError as error:
        raise DeliveryRejected(400, f"body is not JSON: {error}") from error
    if not isinstance(payload, dict):
        raise DeliveryRejected(400, "body is not a JSON object")
    return payload


def model_role(name: str, tags: dict[str, str]) -> str:
    """What a registered version is, for triggers: ``edge``, ``foundation``, ``merged`` or ``fine-tune``."""
    if name.endswith("-edge"):
        return "edge"
    if name.startswith("foundation-"):
        return "foundation"
    if any(key.startswith("vitrail.merge") for key in tags):
        return "merged"
    return "fine-tune"


@dataclass(frozen=True)
class RegistryEvent:
    """The Prefect event a delivery becomes."""

    event: str
    resource: dict[str, str]
    payload: dict
    id: uuid.UUID | None = None


def registry_event(payload: dict, delivery_id: str | None = None) -> RegistryEvent | None:
    """The Prefect event for an MLflow webhook payload, or None for registry changes no flow reacts to."""
    entity, action, data = payload.get("entity"), payload.get("action"), payload.get("data") or {}
    if f"{entity}.{action}" not in RELAYED_EVENTS:
        return None
    name, version = str(data.get("name", "")), str(data.get("version", ""))
    if not name or not version:
        raise DeliveryRejected(400, f"{entity}.{action} payload without a model name and version")
    resource = {"prefect.resource.id": f"mlflow.model-version.{name}.{version}",
                "prefect.resource.name": f"{name}/{version}",
                "mlflow.model": name, "mlflow.version": version, "mlflow.model_uri": f"models:/{name}/{version}"}
    if entity == "model_version_alias":
        resource["mlflow.alias"] = str(data.get("alias", ""))
    else:
        tags = {str(k): str(v) for k, v in (data.get("tags") or {}).items()}
        resource.update({"mlflow.run_id": str(data.get("run_id") or ""), "vitrail.role": model_role(name, tags)})
    try:
        event_id = uuid.UUID(delivery_id) if delivery_id else None
    except ValueError:
        event_id = None
    return RegistryEvent(f"mlflow.{entity}.{action}", resource, payload, event_id)


def emit_registry_event(event: RegistryEvent) -> str:
    """Send the event to the Prefect API (``PREFECT_API_URL``); return its id."""
    from prefect.events import emit_event

    emitted = emit_event(event=event.event, resource=event.resource, payload=event.payload,
                         **({"id": event.id} if event.id else {}))
    if emitted is None:
        raise RuntimeError("Prefect events are not enabled for this process (no PREFECT_API_URL?)")
    return str(emitted.id)


def create_relay_app(secret: str | None = None, max_skew_s: float | None = None):
    """The relay as an ASGI app: ``POST /mlflow/webhook`` (MLflow's deliveries) and ``GET /health``.

    ``secret`` defaults to ``$VITRAIL_WEBHOOK_SECRET`` (the secret given to ``create_webhook``), the skew to
    ``$VITRAIL_WEBHOOK_MAX_SKEW_S`` or 300 s.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    secret = secret if secret is not None else os.environ.get(SECRET_ENV, "")
    if not secret:
        raise RequestError(f"the relay needs the webhook's secret: set {SECRET_ENV} "
                           "(the same secret MLflow signs with)")
    guard = ReplayGuard(float(max_skew_s if max_skew_s is not None
                              else os.environ.get(MAX_SKEW_ENV, DEFAULT_MAX_SKEW_S)))
    app = FastAPI(title="Vitrail registry event relay", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post(WEBHOOK_PATH)
    async def deliver(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            payload = verify_delivery(dict(request.headers), body, secret, guard)
            event = registry_event(payload, request.headers.get(DELIVERY_ID_HEADER))
        except DeliveryRejected as rejected:
            log.warning("rejected delivery %s: %s", request.headers.get(DELIVERY_ID_HEADER, "?"), rejected.reason)
            return JSONResponse({"error": rejected.reason}, status_code=rejected.status)
        if event is None:
            return JSONResponse({"ignored": f"{payload.get('entity')}.{payload.get('action')}"}, status_code=200)
        try:
            event_id = emit_registry_event(event)
        except Exception as error:  # noqa: BLE001 - any failure to hand the event on is answered the same way
            # MLflow retries a 5xx with the same delivery id: it must not then be refused as a replay.
            guard.forget(request.headers.get(DELIVERY_ID_HEADER, ""))
            log.error("could not emit %s to Prefect: %s", event.event, error)
            return JSONResponse({"error": f"could not emit the Prefect event: {error}"}, status_code=503)
        log.info("relayed %s for %s as Prefect event %s", event.event, event.resource["prefect.resource.name"],
                 event_id)
        return JSONResponse({"event": event.event, "id": event_id}, status_code=202)

    return app


def register_webhook(url: str, secret: str, name: str = WEBHOOK_NAME) -> str:
    """Create (or point and re-key) the MLflow webhook ``name`` that delivers registry events to ``url``.

    Uses ``MLFLOW_TRACKING_URI`` (a tracking server with a SQL store: webhooks fire only there). Returns the
    webhook id.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    existing = [hook for hook in client.list_webhooks() if hook.name == name]
    if existing:
        hook = client.update_webhook(existing[0].webhook_id, url=url, events=list(RELAYED_EVENTS), secret=secret,
                                     status="ACTIVE")
    else:
        hook = client.create_webhook(name=name, url=url, events=list(RELAYED_EVENTS), secret=secret,
                                     description="Vitrail: registry events to Prefect (vitrail relay)")
    return hook.webhook_id
