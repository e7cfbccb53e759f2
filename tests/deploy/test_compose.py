"""deploy/compose.yaml hangs together, and describes the stack the integration test starts.

No Docker here, so nothing is run: the checks are what a `docker compose config` would catch (dangling service
references, unset variables) plus what it would not: every address in an environment names a service on the port
that service listens on, every Prefect setting is one Prefect knows, the Redis settings are the ones
tests/integration/team_stack.py starts the servers with, the relay's command parses with `vitrail relay`'s own
argument parser, and only the object store, its bucket job and the MLflow server hold the bucket's keys.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
# Ports of the images that the compose file does not set on a command line.
IMAGE_PORTS = {"postgres": 5432, "redis": 6379}
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")
ADDRESS = re.compile(r"(?:https?|redis|tcp|s3|postgresql(?:\+asyncpg)?)://(?:[^@/\s]*@)?([a-z][a-z0-9-]*):(\d+)")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _command(service: dict) -> str:
    command = service.get("command", [])
    return command if isinstance(command, str) else " ".join(map(str, command))


def _environment(service: dict) -> dict[str, str]:
    return {key: str(value) for key, value in (service.get("environment") or {}).items()}


def listening_port(name: str, service: dict) -> int | None:
    """The port a service listens on: from its command line (--port N, -s3.port=N) or its image's default."""
    found = re.search(r"(?:--port[ =]|-s3\.port=)(\d+)", _command(service))
    if found:
        return int(found.group(1))
    image = service.get("image", "").split(":")[0].rsplit("/", 1)[-1]
    return IMAGE_PORTS.get(image)


def test_every_reference_names_a_service_that_can_satisfy_it(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for target, rule in (depends.items() if isinstance(depends, dict) else ((d, {}) for d in depends)):
            assert target in services, f"{name} depends on unknown service {target}"
            condition = rule.get("condition", "service_started")
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy: it has no check"
            if condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is waited on to finish but restarts"
            # A service outside every profile cannot wait for one that only runs in a profile.
            assert not services[target].get("profiles") or service.get("profiles"), (name, target)
        for config in service.get("configs", []):
            assert config["source"] in compose["configs"], f"{name} mounts unknown config {config['source']}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith((".", "/")) or source in compose["volumes"], f"{name}: unknown volume {source}"


def test_every_address_names_a_service_on_its_port(compose: dict) -> None:
    services = compose["services"]
    text_by_service = {name: " ".join([_command(s), *_environment(s).values()]) for name, s in services.items()}
    checked = 0
    for name, text in text_by_service.items():
        for host, port in ADDRESS.findall(text):
            if host in ("localhost",):
                continue
            assert host in services, f"{name} points at {host}:{port}, which is no service"
            assert listening_port(host, services[host]) == int(port), f"{name} expects {host} on port {port}"
            checked += 1
    assert checked >= 10


def test_every_variable_is_documented_in_the_env_example_and_used(compose: dict) -> None:
    example = (ROOT / "deploy" / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z0-9_]+)=", example, flags=re.MULTILINE))
    used = set(INTERPOLATION.findall(COMPOSE.read_text()))
    assert used == documented, f"only in compose.yaml: {used - documented}; only in .env.example: {documented - used}"
    # Secrets have no default in the example (a blank the operator must fill), and compose refuses to start without.
    for variable in used:
        assert re.search(r"\$\{" + variable + r":\?", COMPOSE.read_text()), f"{variable} may start empty"


def test_published_ports_stay_on_loopback(compose: dict) -> None:
    ports = [(name, port) for name, s in compose["services"].items() for port in s.get("ports", [])]
    assert ports and all(str(port).startswith("127.0.0.1:") for _, port in ports), ports


def test_prefect_settings_are_real_and_match_the_team_stack_test(compose: dict) -> None:
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names
    from prefect_redis.client import RedisMessagingSettings

    valid = _get_valid_setting_names(Settings) | {
        f"PREFECT_REDIS_MESSAGING_{field.upper()}" for field in RedisMessagingSettings.model_fields}
    for name, service in compose["services"].items():
        unknown = {key for key in _environment(service) if key.startswith("PREFECT_")} - valid
        assert not unknown, f"{name}: Prefect has no settings {unknown}"

    stack = _team_stack_module()
    server_env = _environment(compose["services"]["prefect-server"])
    fake = type("Stack", (), {"redis_url": "redis://redis:6379/0"})()
    expected = stack._redis_settings(fake)
    assert {key: server_env[key] for key in expected} == expected
    assert _environment(compose["services"]["prefect-services"]).keys() >= expected.keys()
    assert "--no-services" in _command(compose["services"]["prefect-server"])
    assert _command(compose["services"]["prefect-services"]) == "prefect server services start"


def test_mlflow_runs_like_the_team_stack_test_and_alone_holds_the_bucket_keys(compose: dict) -> None:
    services = compose["services"]
    command = _command(services["mlflow"])
    stack = _team_stack_module()
    assert "--app-name basic-auth" in command
    assert f"--artifacts-destination s3://{stack.BUCKET}/{stack.ARTIFACTS_PREFIX}" in command
    assert stack.BUCKET in _command(services["create-bucket"])
    holders = {name for name, s in services.items() if "AWS_SECRET_ACCESS_KEY" in _environment(s)}
    assert holders == {"seaweedfs", "create-bucket", "mlflow"}
    for name in ("worker", "relay", "dask-worker"):
        assert _environment(services[name])["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_worker_serves_the_deployments_pool_and_the_relay_command_parses(compose: dict) -> None:
    from flows.cli import build_parser

    deployments = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
    worker = compose["services"]["worker"]["command"]
    assert {d["work_pool"]["name"] for d in deployments} == {worker[worker.index("--pool") + 1]}
    relay = compose["services"]["relay"]["command"]
    assert relay[0] == "vitrail"
    args = build_parser().parse_args(relay[1:])
    assert (args.verb, args.host, args.port) == ("relay", "0.0.0.0", 8765)
    assert args.register_url.startswith("http://relay:8765/")


def test_dask_services_are_optional(compose: dict) -> None:
    services = compose["services"]
    optional = {name for name, s in services.items() if s.get("profiles")}
    assert optional == {"dask-scheduler", "dask-worker"}
    assert "tcp://dask-scheduler:8786" in _command(services["dask-worker"])


def _team_stack_module():
    """tests/integration/team_stack.py, loaded by path (its folder is not on this test's import path)."""
    folder = ROOT / "tests" / "integration"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # team_stack imports integration_support beside it
    return importlib.import_module("team_stack")
