"""The Agents page: every agent with its sync state, counts per state, filters, live table."""

from __future__ import annotations

import html as htmllib
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from tests.web.agent_sim import SimAgent, create_service

HX = {"HX-Request": "true"}


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path, database_url=db_url, poll_hold_s=0.2, allowed_hosts=["testserver"]
    )


def rows(html: str) -> dict[str, str]:
    """agent id → the text of its row."""
    found = re.findall(r'<tr data-agent="([^"]+)">(.*?)</tr>', html, re.S)
    return {
        agent: htmllib.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", row))).strip()
        for agent, row in found
    }


def counts(html: str) -> str:
    match = re.search(r'<p class="results-summary" id="agent-counts">(.*?)</p>', html, re.S)
    assert match
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", match.group(1))).strip()


@pytest.fixture
def fleet(client: TestClient) -> None:
    """reviews v1 (synced), reviews v2 (refused the latest push), ratings v1 (never polled)."""
    create_service(client, "reviews")
    synced = SimAgent(client, "reviews-1", "reviews", "v1", "10.0.0.1:9080")
    refusing = SimAgent(client, "reviews-2", "reviews", "v2", "10.0.0.2:9080")
    SimAgent(client, "ratings-1", "ratings", "v1", "10.0.1.1:9080")
    synced.sync()
    refusing.sync(refuse="unknown version v3 in route default")
    synced.sync()  # the ratings registration may have moved reviews' snapshot meanwhile


def test_agents_page_lists_every_agent_like_proxy_status(client: TestClient, fleet: None) -> None:
    response = client.get("/agents")
    assert response.status_code == 200
    html = response.text
    assert 'href="/agents" aria-current="page"' in html
    assert counts(html) == "3 agents : 1 SYNCED, 1 NACKED, 1 NOT_SENT"
    found = rows(html)
    assert set(found) == {"reviews-1", "reviews-2", "ratings-1"}
    assert "reviews" in found["reviews-1"] and "v1" in found["reviews-1"]
    assert "10.0.0.1:9080" in found["reviews-1"] and "0.1.0-test" in found["reviews-1"]
    assert "SYNCED" in found["reviews-1"] and "just now" in found["reviews-1"]
    assert "NACKED" in found["reviews-2"]
    assert "unknown version v3 in route default" in found["reviews-2"]
    assert "NOT_SENT" in found["ratings-1"]
    # The state is text with an icon, not a colour alone.
    assert re.search(r'badge-sync"><span aria-hidden="true">✕</span>NACKED', html)
    # The table refreshes itself every 2 s.
    assert 'id="agents-results" hx-get="/agents" hx-trigger="every 2s"' in html


def test_filters_narrow_the_table_keep_the_counts_and_move_the_address_bar(
    client: TestClient, fleet: None
) -> None:
    response = client.get(
        "/agents?namespace=&service=reviews&state=",
        headers={**HX, "HX-Trigger": "agent-filters"},
    )
    assert response.status_code == 200
    html = response.text
    assert html.lstrip().startswith('<div id="agents-results"')  # the block only
    assert set(rows(html)) == {"reviews-1", "reviews-2"}
    assert counts(html).startswith("2 agents : 1 SYNCED, 1 NACKED")
    assert response.headers["HX-Push-Url"] == "/agents?service=reviews"
    # The live refresh keeps the filters.
    assert 'hx-get="/agents?service=reviews" hx-trigger="every 2s"' in html

    nacked = client.get("/agents?service=reviews&state=NACKED", headers=HX)
    assert set(rows(nacked.text)) == {"reviews-2"}
    assert "HX-Push-Url" not in nacked.headers  # a refresh, not the filter form

    none = client.get("/agents?service=nosuch", headers=HX).text
    assert rows(none) == {}
    assert "No agent matches these filters" in none


def test_an_unknown_state_filter_shows_every_state(client: TestClient, fleet: None) -> None:
    html = client.get("/agents?state=bogus").text
    assert len(rows(html)) == 3


def test_no_agents_says_how_to_start_one(client: TestClient) -> None:
    html = client.get("/agents").text
    assert "No agents yet" in html
    assert "--token $(meshctl token show)" in html
