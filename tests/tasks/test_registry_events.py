"""The relay's checks on MLflow webhook deliveries, against MLflow's own signer (no servers needed: every
delivery here is refused or ignored before an event would be emitted)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from mlflow.webhooks.delivery import _generate_hmac_signature

from tasks.registry_events import (
    WEBHOOK_PATH,
    DeliveryRejected,
    ReplayGuard,
    create_relay_app,
    model_role,
    registry_event,
    sign_delivery,
    verify_delivery,
)

SECRET = "s3cret"
ALIAS = {"name": "satellite-tile-classification-edge", "alias": "champion", "version": "3"}
BODY = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "t", "data": ALIAS}).encode()


def _headers(body: bytes = BODY, secret: str = SECRET, delivery: str | None = None, at: int | None = None) -> dict:
    delivery = delivery or str(uuid.uuid4())
    at = int(time.time()) if at is None else at
    return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": str(at),
            "X-MLflow-Signature": _generate_hmac_signature(secret, delivery, str(at), body.decode())}


def test_signature_is_mlflows() -> None:
    assert sign_delivery(SECRET, "id", "12", BODY) == _generate_hmac_signature(SECRET, "id", "12", BODY.decode())


def test_verify_accepts_once_and_refuses_forged_stale_and_replayed() -> None:
    guard = ReplayGuard(window_s=300)
    headers = _headers()
    assert verify_delivery(headers, BODY, SECRET, guard)["data"]["version"] == "3"
    with pytest.raises(DeliveryRejected, match="replay") as replay:
        verify_delivery(headers, BODY, SECRET, guard)
    assert replay.value.status == 409
    for bad, match in ((_headers(secret="other"), "signature"), ({}, "missing"),
                       (_headers(at=int(time.time()) - 301), "timestamp"),
                       (_headers(at=int(time.time()) + 400), "timestamp")):
        with pytest.raises(DeliveryRejected, match=match) as rejected:
            verify_delivery(bad, BODY, SECRET, guard)
        assert rejected.value.status == 401
    tampered = _headers()
    with pytest.raises(DeliveryRejected, match="signature"):
        verify_delivery(tampered, BODY.replace(b'"3"', b'"4"'), SECRET, guard)


def test_events_and_roles() -> None:
    event = registry_event(json.loads(BODY), "6f1d4d0e-8a1e-4c1e-9d0e-0a4c3e2b1f00")
    assert event.event == "mlflow.model_version_alias.created"
    assert event.resource["mlflow.alias"] == "champion" and event.resource["mlflow.version"] == "3"
    assert event.resource["mlflow.model_uri"] == "models:/satellite-tile-classification-edge/3"
    assert str(event.id) == "6f1d4d0e-8a1e-4c1e-9d0e-0a4c3e2b1f00"
    created = registry_event({"entity": "model_version", "action": "created",
                              "data": {"name": "satellite-tile-classification", "version": "7", "run_id": "r",
                                       "tags": {"vitrail.gate": "passed"}}})
    assert created.resource["vitrail.role"] == "fine-tune" and created.resource["mlflow.run_id"] == "r"
    assert registry_event({"entity": "model_version_tag", "action": "set", "data": {}}) is None
    assert model_role("satellite-tile-classification-edge", {}) == "edge"
    assert model_role("satellite-tile-classification-merged", {"vitrail.merge.method": "opcm"}) == "merged"
    assert model_role("foundation-satellite", {}) == "foundation"


def test_relay_app_answers_401_409_and_ignores_other_events() -> None:
    client = TestClient(create_relay_app(secret=SECRET))
    assert client.get("/health").json() == {"status": "ok"}
    assert client.post(WEBHOOK_PATH, content=BODY, headers=_headers(secret="other")).status_code == 401
    assert client.post(WEBHOOK_PATH, content=BODY).status_code == 401
    other = json.dumps({"entity": "model_version_tag", "action": "set", "data": {}}).encode()
    headers = _headers(other)
    assert client.post(WEBHOOK_PATH, content=other, headers=headers).json() == {"ignored": "model_version_tag.set"}
    assert client.post(WEBHOOK_PATH, content=other, headers=headers).status_code == 409


def test_a_delivery_that_could_not_be_relayed_may_be_retried(monkeypatch) -> None:
    import tasks.registry_events

    def unreachable(event):
        raise ConnectionError("Prefect API unreachable")

    monkeypatch.setattr(tasks.registry_events, "emit_registry_event", unreachable)
    client = TestClient(create_relay_app(secret=SECRET))
    headers = _headers()
    failed = client.post(WEBHOOK_PATH, content=BODY, headers=headers)
    assert failed.status_code == 503 and "unreachable" in failed.json()["error"]
    # MLflow's retry carries the same delivery id: not a replay, since nothing was relayed.
    assert client.post(WEBHOOK_PATH, content=BODY, headers=headers).status_code == 503
