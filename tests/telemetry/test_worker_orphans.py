"""A console killed outright (SIGKILL) leaves no OTLP worker process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.telemetry.support import protobuf_body, sdk_spans

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_workers_leave_when_the_console_is_killed(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "MESH_DATA_DIR": str(tmp_path),
        "MESH_PORT": str(port),
        "MESH_OTLP_WORKER_PROCESSES": "1",
    }
    env.pop("MESH_DATABASE_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: set[int] = set()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "meshctl serve exited"
            assert time.monotonic() < deadline, "meshctl serve did not start"
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        token = (tmp_path / "join-token").read_text().strip()
        sent = httpx.post(
            url + "/v1/traces",
            content=protobuf_body(sdk_spans()),
            headers={
                "content-type": "application/x-protobuf",
                "authorization": f"Bearer {token}",
            },
            timeout=60,
        )
        assert sent.status_code == 200  # stored by the worker process, which now exists
        workers = {pid for pid in _children(server.pid) if "spawn_main" in _cmdline(pid)}
        assert workers, "no OTLP worker process was started"
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "an OTLP worker outlived its console"
            time.sleep(0.1)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""
