"""The canary control in a real Chromium against a real ``meshctl serve`` and two real
``mesh-agent`` processes: click 25 %, watch every agent sync, find the change in the timeline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser.conftest import (
    REPO_ROOT,
    WAIT_MS,
    admin_token,
    free_port,
    meshctl,
    sign_in_path,
    wait_until_ready,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]

SERVICE_URL = "/services/default/reviews"
# Generous bound for the push to reach both agents on a loaded CI machine (it usually takes
# a fraction of a second); the wait ends as soon as the text shows up.
SYNC_TIMEOUT_MS = 20_000


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


OPERATOR: dict[str, str] = {}
MESH_ENV: dict[str, str] = {}


def _agents(url: str) -> dict[str, Any]:
    request = urllib.request.Request(url + "/api/v1/agents", headers=OPERATOR)
    with urllib.request.urlopen(request, timeout=2) as response:
        result: dict[str, Any] = json.load(response)
        return result


def _post(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **OPERATOR},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 201


def _wait_for_synced(url: str, count: int, timeout: float = 60.0) -> None:
    """Until ``count`` agents report SYNCED (an event the test waits on, bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _agents(url)["counts"]["SYNCED"] == count:
            return
        time.sleep(0.1)
    raise AssertionError(f"agents never synced: {_agents(url)}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A control plane of its own (its join token is in its data directory) with two agents
    in front of reviews v1 and v2."""
    data_dir = tmp_path_factory.mktemp("traffic-server")
    env = {
        **os.environ,
        "MESH_DATABASE_URL": f"sqlite:///{data_dir / 'mesh.db'}",
        "MESH_DATA_DIR": str(data_dir),
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (data_dir / "server.log").open("wb")
    processes = [
        subprocess.Popen(
            [*meshctl(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    ]
    try:
        wait_until_ready(url, processes[0], timeout=60)
        OPERATOR["Authorization"] = f"Bearer {admin_token(env)}"
        MESH_ENV.update(env)
        # v1 then v2, so v2 is the newest version (the default canary candidate), whichever
        # agent registers first.
        _post(url + "/api/v1/services", {"name": "reviews", "owner_team": "shop"})
        for version in ("v1", "v2"):
            _post(url + "/api/v1/services/reviews/versions", {"name": version})
        token = (data_dir / "join-token").read_text().strip()
        agent = Path(sys.executable).with_name("mesh-agent")
        for version in ("v1", "v2"):
            state_dir = data_dir / f"agent-{version}"
            processes.append(
                subprocess.Popen(
                    [
                        str(agent),
                        *("--control-plane", url, "--token", token),
                        *("--service", "reviews", "--version", version),
                        # Nothing listens at the app address: this test needs config, not traffic.
                        *("--app", "127.0.0.1:9", "--inbound", "127.0.0.1:0"),
                        *("--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"),
                        *("--state-dir", str(state_dir)),
                    ],
                    cwd=REPO_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        _wait_for_synced(url, 2)
        yield url
    finally:
        for process in reversed(processes):
            _stop(process)
        log.close()


@pytest.fixture
def console(browser: Browser, mesh: str) -> Iterator[Page]:
    context = browser.new_context(base_url=mesh, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    # An operator of the team that owns reviews (the fixture's catalog entry: team "shop").
    page.goto(
        sign_in_path("shop-oncall@example.com", role="operator", teams=("shop",), env=MESH_ENV)
    )
    yield page
    context.close()


def test_click_25_percent_and_watch_every_agent_sync(console: Page) -> None:
    from playwright.sync_api import expect

    page = console
    page.goto(SERVICE_URL)
    traffic = page.locator("#traffic")
    expect(traffic.get_by_role("heading", name="Traffic")).to_be_visible()
    page.evaluate("window.__same_document = true")

    # The candidate defaults to the newest version; choosing another swaps the baseline.
    expect(traffic.get_by_label("Canary version")).to_have_value("v2")
    traffic.get_by_label("Canary version").select_option("v1")
    expect(traffic.locator(".canary-baseline")).to_contain_text("Baseline: v2")
    traffic.get_by_label("Canary version").select_option("v2")
    expect(traffic.locator(".canary-baseline")).to_contain_text("Baseline: v1")
    traffic.get_by_role("button", name="25 %", exact=True).click()
    expect(traffic.get_by_role("slider", name="Share")).to_have_value("25")
    expect(traffic.locator("output")).to_have_text("25 %")
    expect(traffic.locator("#share-result")).to_contain_text("v1 75 %, v2 25 %")
    traffic.get_by_label("Reason").fill("canary of the new ranking")
    traffic.get_by_role("button", name="Apply").click()

    progress = page.locator("#change-progress")
    expect(progress).to_contain_text(re.compile(r"2/2 synced in \d+ ms"), timeout=SYNC_TIMEOUT_MS)
    expect(progress).to_contain_text("v1 75 %, v2 25 %")
    expect(page.locator(".split")).to_have_attribute(
        "aria-label", "Current split: v1 75 %, v2 25 %"
    )
    entry = page.locator("#traffic-timeline li").first
    expect(entry).to_contain_text("v1 75 %, v2 25 %")
    expect(entry).to_contain_text("canary of the new ranking")
    expect(entry).to_contain_text(re.compile(r"2/2 agents in \d+ ms"), timeout=SYNC_TIMEOUT_MS)
    expect(entry).to_contain_text("converged")

    # Promote: one click and a confirmation.
    page.once("dialog", lambda dialog: dialog.accept())
    traffic.get_by_role("button", name="Promote v2 (100 %)").click()
    expect(page.locator("#change-progress")).to_contain_text("v1 0 %, v2 100 %")
    expect(page.locator("#change-progress")).to_contain_text(
        re.compile(r"2/2 synced in"), timeout=SYNC_TIMEOUT_MS
    )
    expect(page.locator("#traffic-timeline li")).to_have_count(2)
    assert page.evaluate("window.__same_document") is True  # no full page load

    page.goto("/agents")
    expect(page.locator("#agent-counts")).to_contain_text("2 agents: 2 SYNCED")
    page.get_by_label("Sync state").select_option("NACKED")
    expect(page).to_have_url(re.compile(r"/agents\?state=NACKED$"))
    expect(page.locator("#agents-results")).to_contain_text("No agent matches these filters")


def test_editing_a_policy_with_an_invalid_value_shows_the_inline_error(console: Page) -> None:
    from playwright.sync_api import expect

    page = console
    page.goto(SERVICE_URL + "/traffic")
    editor = page.get_by_label("Traffic policy (YAML)")
    expect(editor).to_be_visible()
    invalid = (
        "routes:\n- name: default\n  backends:\n  - version: v1\n    weight: 60\n"
        "  - version: v2\n    weight: 30\n"
    )
    editor.fill(invalid)
    page.get_by_role("button", name="Preview").click()
    preview = page.locator("#preview")
    expect(preview).to_contain_text("spec.routes[0].backends")
    expect(preview).to_contain_text("weights must sum to 100 (they sum to 90)")

    page.get_by_role("button", name="Save").click()
    issues = page.locator("#save-issues")
    expect(issues).to_contain_text("spec.routes[0].backends")
    expect(page.get_by_label("Traffic policy (YAML)")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Traffic policy (YAML)")).to_have_value(invalid)

    # Fixed, previewed (a diff) and saved: a new revision in the list.
    page.get_by_label("Traffic policy (YAML)").fill(invalid.replace("weight: 30", "weight: 40"))
    page.get_by_role("button", name="Preview").click()
    added = page.locator("#preview .td-add")
    expect(added.filter(has_text="weight: 40")).to_have_count(1)
    expect(added.filter(has_text="weight: 30")).to_have_count(0)
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".flash")).to_contain_text("Saved revision")
    expect(page.locator("#revisions li").first).to_contain_text("in force")

    # Revert an earlier revision: one click, a confirmation, and a new revision in force.
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=re.compile(r"^Revert to revision \d+$")).first.click()
    expect(page.locator(".flash")).to_contain_text(re.compile(r"Reverted to revision \d+"))
    expect(page.locator("#revisions li").first).to_contain_text("revert to")
