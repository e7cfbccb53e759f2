"""The UIs of the team stack in a real browser: Debian's Chromium driven by Playwright.

A scientist signs in to the Prefect UI, opens the satellite pipeline deployment's run form, sees the domain
dropdown and the nested settings with their descriptions, submits a run, and watches it complete through the
stack's worker; then, in the MLflow UI, the registered model's version carries ``@ champion``. Last, that candidate
is promoted again with approval required: the run pauses, and the reviewer answers its typed form in the flow run
page's Resume dialog (approve, alias, reviewer, comment); the alias moves and the answer is tagged on the versions.
Screenshots of
each step are saved in the test's folder and copied to ``$VITRAIL_SCREENSHOTS`` (default
``/tmp/vitrail-ui-screenshots``), whose path the test prints.

Playwright 1.64.x is the release built for Chromium 156 (Debian bookworm's); the browser is never downloaded:
``executable_path=/usr/bin/chromium``. Without that binary the test is skipped and says how to install it.
"""

from __future__ import annotations

import os
import re
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from integration_support import REPO_ROOT, VENV_BIN, stop_process_group
from team_stack import PIPELINE_DEPLOYMENT, TINY, TeamStack, deploy_pipeline, pipeline_parameters, wait_for_flow_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
RUN_TIMEOUT_S = 600
UI_TIMEOUT_MS = 60_000  # a loaded 2-core machine renders the Prefect UI's first page in 10-30 s


@pytest.fixture()
def browser_context():
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: install Debian's browser with `apt-get install -y chromium` "
                    "(Playwright never downloads one here)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.set_default_timeout(UI_TIMEOUT_MS)
            yield context
        finally:
            browser.close()


def test_a_scientist_runs_the_pipeline_from_the_prefect_ui_and_sees_the_champion_in_mlflow(
        team_stack: TeamStack, browser_context, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    stack, context = team_stack, browser_context
    shots = tmp_path / "screenshots"
    shots.mkdir()
    deployment_id = _pipeline_deployment_with_tiny_defaults(stack, tmp_path)

    page = context.new_page()
    try:
        # Sign in: the Prefect UI asks for the server's auth string when basic auth is on.
        page.goto(f"{stack.prefect_url}/deployments/deployment/{deployment_id}/run")
        page.get_by_placeholder("admin:pass").fill(stack.prefect_auth)
        page.get_by_role("button", name="Login").click()
        page.goto(f"{stack.prefect_url}/deployments/deployment/{deployment_id}/run")

        # The form: the domain is a dropdown of the registry's domains; nested settings render with descriptions.
        domain = page.locator(".schema-form-property").filter(
            has=page.get_by_text("Domain (Optional)", exact=True)).last
        expect(domain.get_by_text("Imaging domain (from the domain registry)")).to_be_visible()
        page.screenshot(path=shots / "01-prefect-run-form.png")
        body = page.inner_text("body")
        for label, description in (("Train (Optional)", "Training settings"),
                                   ("Tiling (Optional)", "Tiling and blocking"),
                                   ("Gate (Optional)", "Promotion thresholds"),
                                   ("Epochs (Optional)", "Passes over the training split")):
            assert f"{label}\n{description}" in body, f"the run form shows no {label!r} with {description!r}"
        choice = domain.locator(".p-select-button__control")
        expect(choice).to_have_text("satellite")  # the deployment's preset
        choice.scroll_into_view_if_needed()
        choice.focus()
        page.keyboard.press("ArrowDown")  # opens the list (a click opens and closes it at once in headless Chromium)
        options = page.get_by_role("option")
        expect(options).to_have_count(4)
        assert sorted(options.all_inner_texts()) == ["histopathology", "hyperspectral", "radiology", "satellite"]
        page.screenshot(path=shots / "02-prefect-domain-dropdown.png")
        page.keyboard.press("Escape")
        expect(choice).to_have_text("satellite")

        # Submit the deployment's preset (the tiny settings) and follow the new run to Completed.
        before = _deployment_runs(stack, deployment_id)
        page.get_by_role("button", name="Submit").click()
        page.wait_for_url(re.compile(rf"/deployments/deployment/{deployment_id}(\?|$)"))
        [flow_run_id] = _deployment_runs(stack, deployment_id) - before
        wait_for_flow_run(stack, flow_run_id, RUN_TIMEOUT_S)
        page.goto(f"{stack.prefect_url}/runs/flow-run/{flow_run_id}")
        expect(page.get_by_text("Completed").first).to_be_visible()
        page.screenshot(path=shots / "03-prefect-run-completed.png")

        # The MLflow UI (basic auth in the browser): the version holding champion is labelled with the alias. It is
        # this run's version, or the one an earlier run of this stack promoted if that one scored at least as well.
        [(champion,)] = stack.query("mlflow", "SELECT version FROM registered_model_aliases WHERE name = %s AND "
                                              "alias = 'champion'", ("satellite-tile-classification",))
        mlflow = context.browser.new_context(viewport={"width": 1400, "height": 1000},
                                             http_credentials={"username": stack.mlflow_pipeline[0],
                                                               "password": stack.mlflow_pipeline[1]})
        try:
            mlflow.set_default_timeout(UI_TIMEOUT_MS)
            models = mlflow.new_page()
            models.goto(f"{stack.mlflow_url}/#/models/satellite-tile-classification")
            row = models.locator("[role=row], tr").filter(has=models.get_by_text(f"Version {champion}", exact=True))
            expect(row).to_contain_text("@ champion")
            models.screenshot(path=shots / "04-mlflow-model-champion.png")
        finally:
            mlflow.close()

        # A promotion that needs a person: the run pauses, the reviewer answers the typed form in the UI's dialog.
        _approve_a_paused_promotion_in_the_resume_dialog(stack, page, shots, tmp_path)
    except Exception:
        page.screenshot(path=shots / "99-failure-prefect.png")
        raise
    finally:
        _publish(shots)


# A promote run started as a team member's script would (not a deployment: the pause is the flow's own).
_PROMOTE = """
import json, sys
from flows.promote import PromoteParams, promote
print(promote(PromoteParams(**json.loads(sys.argv[1]))).model_dump_json())
"""


def _approve_a_paused_promotion_in_the_resume_dialog(stack: TeamStack, page, shots: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    reference, edge = "satellite-tile-classification", "satellite-tile-classification-edge"
    params = {"domain": "satellite", "model_uri": _latest_source(stack, reference),
              "edge_model_uri": _latest_source(stack, edge), "compress_run_id": _latest_stage_run(stack, "compress"),
              "validate_run_id": _latest_stage_run(stack, "validate"), "workdir": str(tmp_path / "approval-work"),
              "gate": TINY["gate"], "approval": {"required": True, "timeout_s": 600}}
    log = tmp_path / "promote.log"
    with log.open("w") as sink:
        process = subprocess.Popen([str(VENV_BIN / "python"), "-c", _PROMOTE, json.dumps(params)], cwd=REPO_ROOT,
                                   env=stack.client_env(), stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        flow_run_id = _paused_promote_run(stack, process, log)
        [(version,)] = stack.query("mlflow", "SELECT MAX(version) FROM model_versions WHERE name = %s", (edge,))
        page.goto(f"{stack.prefect_url}/runs/flow-run/{flow_run_id}")
        page.get_by_role("button", name="Resume").first.click()
        dialog = page.locator(".p-modal").filter(has=page.get_by_text("Resume Flow Run"))
        expect(dialog.get_by_text(f"version {version} as")).to_be_visible()  # the gate's report above the form

        def field(label: str):
            return dialog.locator(".schema-form-property").filter(
                has=page.get_by_text(re.compile(rf"^{label}( \(Optional\))?$"))).last

        approve = field("Approve").get_by_role("switch")  # Prefect's toggle: a label with role=switch
        approve.click()
        expect(approve).to_have_attribute("aria-checked", "true")
        alias = field("Alias").locator(".p-select-button__control")
        expect(alias).to_have_text("champion")  # the gate's suggestion, preselected
        alias.focus()
        page.keyboard.press("ArrowDown")  # opens the list (headless Chromium: a click opens and closes it)
        page.get_by_role("option", name="challenger").click()
        expect(alias).to_have_text("challenger")
        field("Reviewer").locator("input, textarea").first.fill("ana@lab.org")
        field("Comment").locator("input, textarea").first.fill("shadow it for a week first")
        page.screenshot(path=shots / "05-prefect-resume-approval-dialog.png")
        dialog.get_by_role("button", name="Submit").click()
        wait_for_flow_run(stack, flow_run_id, RUN_TIMEOUT_S)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(process, 10)
    for name in (reference, edge):
        [(holder,)] = stack.query("mlflow", "SELECT version FROM registered_model_aliases WHERE name = %s AND "
                                            "alias = 'challenger'", (name,))
        assert str(holder) == str(version), name
        tags = dict(stack.query("mlflow", "SELECT key, value FROM model_version_tags WHERE name = %s AND "
                                          "version = %s AND key LIKE 'vitrail.approval.%%'", (name, holder)))
        assert (tags["vitrail.approval.status"], tags["vitrail.approval.alias"], tags["vitrail.approval.reviewer"],
                tags["vitrail.approval.comment"]) == ("approved", "challenger", "ana@lab.org",
                                                      "shadow it for a week first"), tags


def _latest_source(stack: TeamStack, name: str) -> str:
    [(source,)] = stack.query("mlflow", "SELECT source FROM model_versions WHERE name = %s ORDER BY version DESC "
                                        "LIMIT 1", (name,))
    return source


def _latest_stage_run(stack: TeamStack, stage: str) -> str:
    [(run_id,)] = stack.query("mlflow", "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE "
                                        "t.key = 'vitrail.stage' AND t.value = %s ORDER BY r.start_time DESC LIMIT 1",
                              (stage,))
    return run_id


def _paused_promote_run(stack: TeamStack, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the promote run ended before pausing:\n{log.read_text()[-3000:]}"
        with stack.prefect_http() as client:
            runs = client.post("/flow_runs/filter", json={
                "flows": {"name": {"any_": ["promote-model"]}},
                "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}}).json()
        if runs:
            return runs[0]["id"]
        time.sleep(2)
    raise AssertionError(f"no paused promote run in {timeout_s} s:\n{log.read_text()[-3000:]}")


def _publish(shots: Path) -> None:
    """Copy the screenshots to a stable folder and print where they are (also after a failure)."""
    destination = Path(os.environ.get("VITRAIL_SCREENSHOTS", "/tmp/vitrail-ui-screenshots"))
    destination.mkdir(parents=True, exist_ok=True)
    for shot in sorted(shots.iterdir()):
        shutil.copy2(shot, destination / shot.name)
    print(f"\nscreenshots: {destination} ({', '.join(sorted(p.name for p in shots.iterdir()))})")


def _deployment_runs(stack: TeamStack, deployment_id: str) -> set[str]:
    with stack.prefect_http() as client:
        response = client.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}})
    assert response.status_code == 200, response.text
    return {run["id"] for run in response.json()}


def _pipeline_deployment_with_tiny_defaults(stack: TeamStack, tmp_path: Path) -> str:
    """The pipeline deployment (registered when no earlier test did) with the tiny settings as its defaults, so
    the form opens on a run that finishes in minutes; a team's preset lives in the same place."""
    with stack.prefect_http() as client:
        found = client.get(f"/deployments/name/{PIPELINE_DEPLOYMENT}")
    deployment_id = found.json()["id"] if found.status_code == 200 else deploy_pipeline(stack)
    parameters, _ = pipeline_parameters(tmp_path)
    with stack.prefect_http() as client:
        response = client.patch(f"/deployments/{deployment_id}", json={"parameters": parameters})
    assert response.status_code == 204, response.text
    return deployment_id
