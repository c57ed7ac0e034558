"""A real mesh on loopback for end-to-end tests: ``meshctl serve``, backends that answer with
their version, ``mesh-agent`` processes connected to the control plane, and a caller.

Every process is started with its own log file in the test's tmp folder and killed at the end.
Waits are on observable events (an HTTP answer, an API state), bounded in time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

MESHCTL = [sys.executable, "-c", "from app.cli import main; main()"]
AGENT = [sys.executable, "-m", "mesh_agent"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool],
    limit_s: float = 30.0,
    what: str = "",
    detail: Callable[[], str] | None = None,
) -> None:
    """Wait for ``predicate`` (a cap, not a timing assertion); on timeout, ``detail`` says
    what the state was, so that a failure on a busy CI can be read from its message."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            if predicate():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            message = f"timed out waiting for {what or predicate}"
            if detail is not None:
                try:
                    message += f"; {detail()}"
                except Exception as exc:  # the detail is a courtesy: never hide the timeout
                    message += f"; (no detail: {exc!r})"
            raise AssertionError(message)
        time.sleep(0.05)


class VersionBackend:
    """An HTTP server that answers every GET with its name (e.g. ``v2``)."""

    def __init__(self, name: str) -> None:
        body = name.encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Proc:
    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.cmd, self.log_path, self.env = name, cmd, log, env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        self.popen = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


class Mesh:
    def __init__(self, tmp: Path, **settings: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "MESH_DATA_DIR": str(tmp / "cp"),
            "MESH_PORT": str(self.port),
            "MESH_HOST": "127.0.0.1",
            **settings,
        }
        self.cp = Proc("control-plane", [*MESHCTL, "serve"], tmp / "cp.log", self.env)
        self.agents: dict[str, Proc] = {}
        self.ports: dict[str, dict[str, int]] = {}
        self.backends: list[VersionBackend] = []
        self.token = ""
        self.api = httpx.Client(base_url=self.url, timeout=10)

    # -- control plane ----------------------------------------------------------------------

    def start_control_plane(self) -> None:
        self.cp.start()
        wait_until(self._cp_up, 60, f"control plane\n{self.cp.log()}")
        token_file = Path(self.env["MESH_DATA_DIR"]) / "join-token"
        self.token = token_file.read_text().strip()
        if "MESH_TOKEN" not in self.env:
            # The operator: an admin's API token, for self.api and meshctl. `meshctl serve`
            # created the admin account, since no one could sign in yet.
            made = self.meshctl(
                "token", "create", "--user", "admin@mesh.local", "--name", "e2e", "--role", "admin"
            )
            assert made.returncode == 0, made.stderr
            self.env["MESH_TOKEN"] = made.stdout.strip()
            self.api.headers["Authorization"] = f"Bearer {self.env['MESH_TOKEN']}"

    def _cp_up(self) -> bool:
        if not self.cp.alive():
            raise AssertionError(f"control plane exited:\n{self.cp.log()}")
        return httpx.get(self.url + "/healthz", timeout=1).status_code == 200

    # -- agents -------------------------------------------------------------------------------

    def backend(self, name: str) -> VersionBackend:
        backend = VersionBackend(name)
        self.backends.append(backend)
        return backend

    def start_agent(self, key: str, service: str, version: str, *, app: str | None = None) -> Proc:
        ports = self.ports.setdefault(
            key, {"admin": free_port(), "outbound": free_port(), "inbound": free_port()}
        )
        cmd = [
            *AGENT,
            "--service", service,
            "--version", version,
            "--admin", f"127.0.0.1:{ports['admin']}",
            "--outbound", f"127.0.0.1:{ports['outbound']}",
            "--inbound", f"127.0.0.1:{ports['inbound']}",
            "--control-plane", self.url,
            "--token", self.token,
            "--state-dir", str(self.tmp / f"state-{key}"),
            "--sampling-ratio", "0",
        ]  # fmt: skip
        if app is not None:
            cmd += ["--app", app]
        proc = Proc(key, cmd, self.tmp / f"agent-{key}.log", self.env)
        proc.start()
        self.agents[key] = proc
        wait_until(lambda: self._agent_up(proc, ports["admin"]), 30, f"agent {key}")
        return proc

    def _agent_up(self, proc: Proc, admin: int) -> bool:
        if not proc.alive():
            raise AssertionError(f"agent {proc.name} exited:\n{proc.log()}")
        return httpx.get(f"http://127.0.0.1:{admin}/config", timeout=1).status_code == 200

    def agent_config(self, key: str) -> dict[str, Any]:
        admin = self.ports[key]["admin"]
        document: dict[str, Any] = httpx.get(f"http://127.0.0.1:{admin}/config", timeout=5).json()
        return document

    def call(self, key: str, host: str, n: int) -> Counter[str]:
        """``n`` requests from agent ``key``'s app to ``host`` through the mesh; the answers
        (the backend's version, or ``HTTP <status>``) counted."""
        seen: Counter[str] = Counter()
        outbound = self.ports[key]["outbound"]
        with httpx.Client(timeout=10) as client:
            for _ in range(n):
                try:
                    answer = client.get(f"http://127.0.0.1:{outbound}/", headers={"host": host})
                    seen[
                        answer.text if answer.status_code == 200 else f"HTTP {answer.status_code}"
                    ] += 1
                except httpx.TransportError as exc:
                    seen[f"error {exc.__class__.__name__}"] += 1
        return seen

    # -- API ------------------------------------------------------------------------------------

    def agents_state(self) -> dict[str, int]:
        counts: dict[str, int] = self.api.get("/api/v1/agents").json()["counts"]
        return counts

    def all_synced(self, n: int) -> bool:
        return self.agents_state().get("SYNCED") == n

    def shift(self, service: str, weights: dict[str, int], reason: str = "test") -> dict[str, Any]:
        answer = self.api.post(
            f"/api/v1/services/{service}/traffic/weights",
            json={"weights": weights},
            headers={"X-Mesh-Reason": reason},
        )
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def wait_change(self, change_id: int) -> dict[str, Any]:
        result: dict[str, Any] = {}

        def done() -> bool:
            result.update(self.api.get(f"/api/v1/changes/{change_id}").json())
            return result["state"] != "pending"

        wait_until(done, 30, f"change {change_id}")
        return result

    def meshctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*MESHCTL, *args], env=self.env, capture_output=True, text=True, timeout=90
        )

    def close(self) -> None:
        for proc in self.agents.values():
            proc.stop(signal.SIGKILL)
        self.cp.stop()
        for backend in self.backends:
            backend.close()
        self.api.close()
