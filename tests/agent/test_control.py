"""Config sources and the store: reload on change and on demand, rejection keeps the old config,
start from the persisted config."""

from __future__ import annotations

import json
from pathlib import Path

from mesh_agent.balancer import EndpointRegistry
from mesh_agent.config import STATE_FILE
from mesh_agent.control import ConfigStore, FileSource, initial_config

from .support import run, wait_until

GOOD = """
services:
  - name: reviews
    versions:
      v1: {endpoints: ["10.0.0.1:80"]}
"""
GOOD2 = GOOD.replace("10.0.0.1:80", "10.0.0.2:80")
BAD = (
    GOOD
    + """    routes:
      - name: canary
        backends: [{version: v2, weight: 10}]
"""
)


def test_initial_config_from_file_is_persisted_and_used_when_file_is_gone(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(GOOD)
    state = tmp_path / "state"
    first = ConfigStore(EndpointRegistry(), state)
    initial_config(first, str(cfg))
    assert first.ready and first.loaded is not None
    assert json.loads((state / STATE_FILE).read_text())["version"] == first.loaded.version

    cfg.unlink()
    second = ConfigStore(EndpointRegistry(), state)
    initial_config(second, str(cfg))
    assert second.ready and second.loaded is not None
    assert second.loaded.version == first.loaded.version
    assert second.loaded.source.startswith("state:")
    # the file's problem stays visible: the agent says why it runs on the persisted config
    assert second.last_error is not None
    assert "cannot read" in second.last_error["error"]
    assert second.last_error["source"] == f"file:{cfg}"
    assert second.holder.current.service_for(b"reviews") is not None


def test_invalid_file_at_start_falls_back_to_state_and_reports_why(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(GOOD)
    state = tmp_path / "state"
    initial_config(ConfigStore(EndpointRegistry(), state), str(cfg))
    cfg.write_text(BAD)
    store = ConfigStore(EndpointRegistry(), state)
    initial_config(store, str(cfg))
    assert store.ready
    assert store.loaded is not None and store.loaded.source.startswith("state:")
    # the rejection stays visible even though the state file loaded fine afterwards
    assert store.rejected == 1
    assert store.last_error is not None
    assert store.last_error["issues"][0]["path"] == "services[0].routes[0].backends[0].version"


def test_no_config_anywhere_means_not_ready(tmp_path: Path) -> None:
    store = ConfigStore(EndpointRegistry(), tmp_path / "state")
    initial_config(store, None)
    assert not store.ready
    assert store.dump()["version"] is None
    assert store.holder.current.services == ()


def test_file_source_reloads_on_change_and_keeps_old_on_error(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(GOOD)

    async def scenario() -> None:
        store = ConfigStore(EndpointRegistry(), tmp_path / "state")
        initial_config(store, str(cfg))
        assert store.loaded is not None
        v1 = store.loaded.version
        source = FileSource(cfg, store, interval_s=0.05)
        source.start()
        try:
            cfg.write_text(BAD)
            await wait_until(lambda: store.rejected > 0)
            assert store.loaded.version == v1
            err = store.dump()["last_error"]
            assert err is not None
            assert "services[0].routes[0].backends[0].version" in err["error"]
            assert err["issues"][0]["path"] == "services[0].routes[0].backends[0].version"
            old_compiled = store.holder.current

            cfg.write_text(GOOD2)
            await wait_until(lambda: store.loaded is not None and store.loaded.version != v1)
            assert store.holder.current is not old_compiled
            assert store.dump()["last_error"] is None
            svc = store.holder.current.service_for(b"reviews")
            assert svc is not None
            assert svc.pools["v1"].endpoints[0].host == "10.0.0.2"
        finally:
            await source.stop()

    run(scenario())


def test_trigger_reloads_even_if_the_file_looks_unchanged(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(GOOD)

    async def scenario() -> None:
        store = ConfigStore(EndpointRegistry(), None)
        source = FileSource(cfg, store, interval_s=3600)
        source.start()
        try:
            source.trigger()
            await wait_until(lambda: store.ready)
            assert store.accepted == 1
        finally:
            await source.stop()

    run(scenario())


def test_same_content_is_not_swapped_again(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(GOOD)
    store = ConfigStore(EndpointRegistry(), None)
    initial_config(store, str(cfg))
    compiled = store.holder.current
    cfg.write_text("# a comment changes nothing\n" + GOOD)
    source = FileSource(cfg, store)
    assert source.reload()
    assert store.holder.current is compiled
    assert store.accepted == 1
