"""The traffic console: canary control with live progress, timeline, YAML policy editor
(preview, save, stale, revisions, revert), mesh defaults, and the catalog's dependencies field."""

from __future__ import annotations

import html as htmllib
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from tests.web.agent_sim import SimAgent, create_service

HX = {"HX-Request": "true"}
PANEL = "/services/default/reviews/traffic/panel"
WEIGHTS = "/services/default/reviews/traffic/weights"
EDITOR = "/services/default/reviews/traffic"
SPLIT_25 = """routes:
- name: default
  backends:
  - version: v1
    weight: 75
  - version: v2
    weight: 25
"""


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    # Simulated agents end each sync with a held poll that times out: keep that short.
    return Settings(
        data_dir=tmp_path, database_url=db_url, poll_hold_s=0.2, allowed_hosts=["testserver"]
    )


def canary(client: TestClient, share: str = "25", **fields: str) -> Any:
    data = {"candidate": "v2", "share": share, "revision": "0", "action": "apply", **fields}
    return client.post(WEIGHTS, data=data, headers=HX)


def revisions(client: TestClient, name: str = "reviews") -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/services/{name}/traffic/revisions")
    assert response.status_code == 200
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def weights(client: TestClient) -> dict[str, int]:
    spec = client.get("/api/v1/services/reviews/traffic").json()["spec"]
    route = next(r for r in spec["routes"] if r["name"] == "default")
    return {b["version"]: b["weight"] for b in route["backends"]}


def text_of(html: str) -> str:
    return htmllib.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip())


def progress_url(html: str) -> str:
    match = re.search(r'hx-get="(/services/default/reviews/traffic/changes/\d+)"', html)
    assert match, "the progress line does not poll"
    return match.group(1)


def put_policy(client: TestClient, spec: dict[str, Any], revision: int) -> None:
    response = client.put(
        "/api/v1/services/reviews/traffic", json={"revision": revision, "spec": spec}
    )
    assert response.status_code == 200, response.text


def split_spec(v1: int, v2: int) -> dict[str, Any]:
    backends = [{"version": "v1", "weight": v1}, {"version": "v2", "weight": v2}]
    return {"routes": [{"name": "default", "backends": backends}]}


# ---------------------------------------------------------------------------------------------
# The traffic section and the canary control


def test_service_page_loads_the_traffic_section(client: TestClient) -> None:
    create_service(client, "reviews")
    page = client.get("/services/default/reviews").text
    assert 'hx-get="/services/default/reviews/traffic/panel"' in page

    html = client.get(PANEL, headers=HX).text
    assert html.lstrip().startswith('<section id="traffic"')  # the block only
    assert "No split set yet" in html
    # Candidate defaults to the newest version, baseline is the other one.
    assert re.search(r'<option value="v2"\s+selected>', html)
    assert 'Baseline: <strong class="mono">v1</strong>' in html
    for preset in ("0", "1", "5", "10", "25", "50", "100"):
        assert f'data-share="{preset}"' in html
    assert 'type="range" name="share"' in html
    assert '<label for="f-share">Share</label>' in html
    assert 'hx-confirm="Promote v2' in html
    assert 'hx-confirm="Roll back' in html


def test_canary_apply_stores_the_revision_and_reports_every_agent_synced(
    client: TestClient,
) -> None:
    create_service(client, "reviews")
    agents = [
        SimAgent(client, "reviews-a", "reviews", "v1", "10.0.0.1:9080"),
        SimAgent(client, "reviews-b", "reviews", "v2", "10.0.0.2:9080"),
    ]
    for agent in agents:
        agent.sync()

    response = canary(client, "25", reason="try the new ranking")
    assert response.status_code == 200, response.text
    assert weights(client) == {"v1": 75, "v2": 25}
    assert [r["revision"] for r in revisions(client)] == [1]
    assert revisions(client)[0]["reason"] == "try the new ranking"
    html = response.text
    assert "Applied: v1 75 %, v2 25 %" in response.headers["HX-Trigger"]
    # The split is shown as numbers and as a bar whose segments carry their text.
    assert 'aria-label="Current split: v1 75 %, v2 25 %"' in html
    assert re.search(r'class="split-seg[^"]*" style="width: 25%">v2 25 %<', html)
    # Progress polls every 300 ms while pending.
    assert 'hx-trigger="every 300ms"' in html
    url = progress_url(html)

    for agent in agents:
        agent.sync()
    done = client.get(url, headers=HX)
    assert done.status_code == 200
    assert re.search(r"2/2 synced in \d+ ms", text_of(done.text))
    assert "every 300ms" not in done.text  # settled: polling stops
    assert "traffic-changed" in done.headers["HX-Trigger"]  # the timeline refreshes

    timeline = client.get("/services/default/reviews/traffic/timeline", headers=HX).text
    line = text_of(timeline)
    assert "weights" in line and "v1 75 %, v2 25 %" in line
    assert "try the new ranking" in line
    assert re.search(r"2/2 agents in \d+ ms", line)
    assert "converged" in line


def test_an_agent_that_refuses_the_change_is_named_with_its_error(client: TestClient) -> None:
    create_service(client, "reviews")
    good = SimAgent(client, "reviews-good", "reviews", "v1", "10.0.0.1:9080")
    bad = SimAgent(client, "reviews-bad", "reviews", "v2", "10.0.0.2:9080")
    good.sync()
    bad.sync()

    url = progress_url(canary(client, "50").text)
    good.sync()
    bad.sync(refuse="route default: version v2 has no pool")
    html = client.get(url, headers=HX).text
    line = text_of(html)
    assert "1/2 synced, 1 rejected" in line
    assert "reviews-bad" in line
    assert "route default: version v2 has no pool" in line
    assert "reviews-good" not in line
    assert "every 300ms" not in html


def test_promote_and_roll_back_are_one_click_each(client: TestClient) -> None:
    create_service(client, "reviews")
    promoted = canary(client, action="promote", share="")
    assert promoted.status_code == 200, promoted.text
    assert weights(client) == {"v1": 0, "v2": 100}
    rolled = canary(client, action="rollback", share="", revision="1")
    assert rolled.status_code == 200
    assert weights(client) == {"v1": 100, "v2": 0}
    assert [r["revision"] for r in revisions(client)] == [2, 1]


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"share": "150"}, "share", "whole number from 0 to 100"),
        ({"share": "ten"}, "share", "whole number from 0 to 100"),
        ({"candidate": "v9"}, "candidate", "has no version 'v9'"),
    ],
)
def test_invalid_canary_input_is_an_inline_error_and_stores_nothing(
    client: TestClient, fields: dict[str, str], field: str, message: str
) -> None:
    create_service(client, "reviews")
    response = canary(client, **fields)
    assert response.status_code == 422
    error = re.search(rf'<p class="field-error" id="f-{field}-error"[^>]*>(.*?)</p>', response.text)
    assert error and message in htmllib.unescape(error.group(1))
    assert revisions(client) == []
    assert client.get("/api/v1/services/reviews/changes").json() == []


def test_a_stale_canary_click_is_refused_with_409_and_the_current_split(
    client: TestClient,
) -> None:
    create_service(client, "reviews")
    put_policy(client, split_spec(90, 10), revision=0)  # someone else, meanwhile
    response = canary(client, "50", revision="0")
    assert response.status_code == 409
    line = text_of(response.text)
    assert "Someone changed this service's traffic policy since you opened it" in line
    assert "Nothing was applied" in line
    assert f'href="{PANEL}"' in response.text
    assert weights(client) == {"v1": 90, "v2": 10}
    assert len(revisions(client)) == 1


def test_one_version_only_offers_no_canary(client: TestClient) -> None:
    create_service(client, "reviews", versions=("v1",))
    html = client.get(PANEL, headers=HX).text
    assert "add a second version to run a canary" in html
    assert 'id="canary-form"' not in html
    response = canary(client, candidate="v1")
    assert response.status_code == 422
    assert revisions(client) == []


# ---------------------------------------------------------------------------------------------
# The YAML editor


def test_editor_preview_shows_the_diff_and_stores_nothing(client: TestClient) -> None:
    create_service(client, "reviews")
    put_policy(client, split_spec(90, 10), revision=0)
    page = client.get(EDITOR).text
    assert "weight: 90" in page  # the policy in force, as YAML in the textarea
    response = client.post(
        f"{EDITOR}/preview", data={"spec": SPLIT_25, "revision": "1"}, headers=HX
    )
    assert response.status_code == 200
    html = response.text
    assert html.lstrip().startswith('<div id="preview"')
    assert re.search(r'<span class="td-del"><span class="td-mark">-</span>\s*weight: 90', html)
    assert re.search(r'<span class="td-add"><span class="td-mark">\+</span>\s*weight: 75', html)
    assert len(revisions(client)) == 1
    assert weights(client) == {"v1": 90, "v2": 10}


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        (SPLIT_25.replace("weight: 25", "weight: 5"), "spec.routes[0].backends", "sum to 100"),
        (SPLIT_25.replace("version: v2", "version: v7"), "spec.routes[0]", "v7"),
        (SPLIT_25 + "timeout_ms: -5\n", "spec.timeout_ms", "greater than or equal to 0"),
        (
            SPLIT_25.replace("weight: 25", "weight: lots"),
            "spec.routes[0].backends[1].weight",
            "valid integer",
        ),
        (SPLIT_25 + "bogus: 1\n", "spec.bogus", "Extra inputs are not permitted"),
        ("routes: [\n", "spec", "not valid YAML: line"),
        ("- just a list\n", "spec", "must be a mapping"),
        ("a: &x [1, 2]\nb: [*x, *x]\n", "spec", "line 2: YAML aliases (*name) are not supported"),
        ("routes: " + "[" * 100 + "]" * 100 + "\n", "spec", "nested too deeply"),
        ("x" * 100_001, "spec", "at most 100,000 characters"),
    ],
)
def test_editor_preview_lists_each_error_with_its_field_path(
    client: TestClient, text: str, path: str, message: str
) -> None:
    create_service(client, "reviews")
    response = client.post(f"{EDITOR}/preview", data={"spec": text, "revision": "0"}, headers=HX)
    assert response.status_code == 422
    items = re.findall(r'<code class="issue-path">([^<]*)</code>([^<]*)</li>', response.text)
    assert any(p.startswith(path) and message in m for p, m in items), items
    assert "td-add" not in response.text  # no diff for an invalid policy
    assert revisions(client) == []


def test_editor_save_stores_a_revision_and_invalid_saves_nothing(client: TestClient) -> None:
    create_service(client, "reviews")
    bad = SPLIT_25.replace("weight: 25", "weight: 35")
    response = client.post(EDITOR, data={"spec": bad, "revision": "0"}, headers=HX)
    assert response.status_code == 422
    assert "spec.routes[0].backends" in response.text
    assert 'aria-invalid="true"' in response.text
    assert "weight: 35" in response.text  # the text typed is kept
    assert revisions(client) == []

    response = client.post(
        EDITOR,
        data={"spec": SPLIT_25, "revision": "0", "reason": "by hand"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == EDITOR
    assert weights(client) == {"v1": 75, "v2": 25}
    page = client.get(EDITOR).text
    assert "Saved revision 1 of default/reviews" in page
    assert "by hand" in page


def test_editor_save_of_a_stale_revision_is_a_409_with_a_reload_link(client: TestClient) -> None:
    create_service(client, "reviews")
    put_policy(client, split_spec(90, 10), revision=0)
    response = client.post(EDITOR, data={"spec": SPLIT_25, "revision": "0"}, headers=HX)
    assert response.status_code == 409
    line = text_of(response.text)
    assert "Not saved: someone else changed this policy" in line
    assert "You edited revision 0; the stored revision is now 1" in line
    assert f'<a href="{EDITOR}">Reload the latest revision</a>' in response.text
    assert "weight: 75" in response.text  # the user's text is kept
    assert weights(client) == {"v1": 90, "v2": 10}


def test_revert_creates_a_new_revision_with_the_old_content(client: TestClient) -> None:
    create_service(client, "reviews")
    put_policy(client, split_spec(90, 10), revision=0)
    put_policy(client, split_spec(50, 50), revision=1)
    page = client.get(EDITOR).text
    assert 'name="to" value="1"' in page
    assert 'hx-confirm="Revert to revision 1?' in page

    response = client.post(
        f"{EDITOR}/revert", data={"to": "1", "revision": "2"}, follow_redirects=False
    )
    assert response.status_code == 303
    items = revisions(client)
    assert [r["revision"] for r in items] == [3, 2, 1]
    assert items[0]["reverted_from"] == 1
    assert weights(client) == {"v1": 90, "v2": 10}
    assert "Reverted to revision 1: saved as revision 3" in client.get(EDITOR).text

    stale = client.post(f"{EDITOR}/revert", data={"to": "2", "revision": "2"}, headers=HX)
    assert stale.status_code == 409
    assert stale.text.lstrip().startswith('<form id="policy-form"')  # replaces the edit form
    assert "Reload the latest revision" in stale.text
    missing = client.post(f"{EDITOR}/revert", data={"to": "9", "revision": "3"}, headers=HX)
    assert missing.status_code == 404
    assert "Not reverted: default/reviews has no traffic policy revision 9" in missing.text
    assert len(revisions(client)) == 3


def test_revision_page_shows_its_diff_against_the_previous_one(client: TestClient) -> None:
    create_service(client, "reviews")
    put_policy(client, split_spec(90, 10), revision=0)
    put_policy(client, split_spec(50, 50), revision=1)
    html = client.get(f"{EDITOR}/revisions/2").text
    assert re.search(r'td-del"><span class="td-mark">-</span>\s*weight: 90', html)
    assert re.search(r'td-add"><span class="td-mark">\+</span>\s*weight: 50', html)
    assert client.get(f"{EDITOR}/revisions/7").status_code == 404


def test_editor_shows_the_effective_config_and_compiler_warnings(client: TestClient) -> None:
    create_service(client, "reviews")
    SimAgent(client, "reviews-a", "reviews", "v1", "10.0.0.1:9080")  # v2 has no endpoint
    put_policy(client, split_spec(75, 25), revision=0)
    html = client.get(EDITOR).text
    assert "Effective config" in html
    assert "10.0.0.1:9080" in html  # endpoints filled in
    assert "timeout_ms: 15000" in html  # the mesh default applied
    assert "no endpoints for v2" in html


# ---------------------------------------------------------------------------------------------
# Mesh defaults


def test_mesh_defaults_editor_preview_save_and_revert(client: TestClient) -> None:
    page = client.get("/mesh/defaults").text
    assert "timeout_ms: 15000" in page
    assert 'aria-current="page"' in page and "Mesh defaults" in page

    invalid = client.post(
        "/mesh/defaults/preview", data={"spec": "timeout_ms: -1\n", "revision": "0"}, headers=HX
    )
    assert invalid.status_code == 422
    assert '<code class="issue-path">spec.timeout_ms</code>' in invalid.text

    preview = client.post(
        "/mesh/defaults/preview", data={"spec": "timeout_ms: 3000\n", "revision": "0"}, headers=HX
    )
    assert preview.status_code == 200
    assert re.search(r'td-add"><span class="td-mark">\+</span>timeout_ms: 3000', preview.text)
    assert client.get("/api/v1/mesh/defaults").json()["revision"] == 0

    saved = client.post(
        "/mesh/defaults",
        data={"spec": "timeout_ms: 3000\n", "revision": "0"},
        follow_redirects=False,
    )
    assert saved.status_code == 303
    assert client.get("/api/v1/mesh/defaults").json()["spec"]["timeout_ms"] == 3000

    stale = client.post("/mesh/defaults", data={"spec": "timeout_ms: 1\n", "revision": "0"})
    assert stale.status_code == 409
    assert "Reload the latest revision" in stale.text

    reverted = client.post(
        "/mesh/defaults/revert", data={"to": "0", "revision": "1"}, follow_redirects=False
    )
    assert reverted.status_code == 303
    current = client.get("/api/v1/mesh/defaults").json()
    assert (current["revision"], current["spec"]["timeout_ms"]) == (2, 15000)


def test_a_mesh_defaults_change_reports_its_push_to_every_agent(client: TestClient) -> None:
    create_service(client, "reviews")
    agent = SimAgent(client, "reviews-a", "reviews", "v1", "10.0.0.1:9080")
    agent.sync()
    saved = client.post(
        "/mesh/defaults",
        data={"spec": "timeout_ms: 2500\n", "revision": "0", "reason": "tighter"},
        follow_redirects=False,
    )
    assert saved.status_code == 303
    page = client.get("/mesh/defaults").text
    match = re.search(r'hx-get="(/mesh/defaults/changes/\d+)" hx-trigger="every 300ms"', page)
    assert match, "the defaults change does not report its progress"
    agent.sync()
    done = client.get(match.group(1), headers=HX)
    assert re.search(r"1/1 synced in \d+ ms", text_of(done.text))
    assert "mesh defaults revision 1" in text_of(done.text)
    assert client.get("/mesh/defaults/changes/999", headers=HX).status_code == 404


# ---------------------------------------------------------------------------------------------
# The catalog's dependencies field (which services' config an agent receives)


def test_service_form_edits_dependencies_one_per_line(client: TestClient) -> None:
    form = {"namespace": "default", "name": "checkout", "owner_team": "shop"}
    bad = client.post("/services/new", data={**form, "dependencies": "ratings\nBad_Name"})
    assert bad.status_code == 422
    assert re.search(r'id="f-dependencies-error"[^>]*>[^<]*Bad_Name', bad.text)
    assert "ratings\nBad_Name</textarea>" in bad.text

    created = client.post(
        "/services/new",
        data={**form, "dependencies": "ratings\n\nshop/payments\n"},
        follow_redirects=False,
    )
    assert created.status_code == 303
    service = client.get("/api/v1/services/checkout").json()
    assert service["dependencies"] == ["ratings", "shop/payments"]
    edit = client.get("/services/default/checkout/edit").text
    assert "ratings\nshop/payments</textarea>" in edit


def test_editor_survives_a_catalog_entry_the_compiler_refuses(client: TestClient) -> None:
    create_service(client, "reviews")
    response = client.post(
        "/api/v1/services/reviews/instances", json={"address": "0:0", "version": "v1"}
    )
    assert response.status_code == 201, response.text
    page = client.get(EDITOR)
    assert page.status_code == 200
    # The compiler leaves the address out (with a warning) rather than failing the service.
    assert "0:0 of v1 left out" in page.text
    assert "port 0 out of range" in page.text
