"""The real ``mesh-agent`` process: CLI, import hygiene, restart from the persisted config,
reload on SIGHUP, memory while streaming a large body."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from .support import free_port

pytestmark = pytest.mark.e2e

AGENT_CMD = [sys.executable, "-m", "mesh_agent"]


class _Echo(BaseHTTPRequestHandler):
    """Answers with its name; counts and hashes request bodies without keeping them."""

    protocol_version = "HTTP/1.1"
    name = b"app"

    def do_GET(self) -> None:
        body = self.server.name  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        h = hashlib.sha256()
        n = 0
        if self.headers.get("transfer-encoding") == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 16))
                    h.update(chunk)
                    remaining -= len(chunk)
                    n += len(chunk)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("content-length", "0"))
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 16))
                h.update(chunk)
                remaining -= len(chunk)
                n += len(chunk)
        body = f"{n} {h.hexdigest()}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    server.name = b"backend"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class AgentProcess:
    def __init__(self, tmp: Path, command: list[str] = AGENT_CMD) -> None:
        self.tmp = tmp
        self.command = command
        self.procs: list[subprocess.Popen[bytes]] = []
        self.admin = 0
        self.outbound = 0

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        self.admin, self.outbound = free_port(), free_port()
        log = open(self.tmp / f"agent-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                *self.command,
                "--service",
                "web",
                "--admin",
                f"127.0.0.1:{self.admin}",
                "--outbound",
                f"127.0.0.1:{self.outbound}",
                "--state-dir",
                str(self.tmp / "state"),
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"agent exited: {self.log(proc)}")
            try:
                httpx.get(f"http://127.0.0.1:{self.admin}/config", timeout=1)
                return proc
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError(f"agent did not come up: {self.log(proc)}")

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.tmp / f"agent-{self.procs.index(proc)}.log").read_text(errors="replace")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.admin}{path}", timeout=5)

    def call(self, host: str, path: str = "/") -> httpx.Response:
        return httpx.get(
            f"http://127.0.0.1:{self.outbound}{path}", headers={"host": host}, timeout=5
        )

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(tmp_path)
    yield a
    a.stop_all()


def _config(backend: str, *, version: str = "v1") -> str:
    return json.dumps(
        {"services": [{"name": "reviews", "versions": {version: {"endpoints": [backend]}}}]}
    )


def test_help_documents_every_flag() -> None:
    out = subprocess.run(
        [*AGENT_CMD, "--help"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    for flag in (
        "--service",
        "--version",
        "--namespace",
        "--inbound",
        "--app",
        "--outbound",
        "--admin",
        "--config",
        "--state-dir",
        "--sampling-ratio",
        "--otlp-endpoint",
        "--log-level",
        "--max-connections",
        "MESH_AGENT_SERVICE",
        "MESH_AGENT_CONFIG",
    ):
        assert flag in out, flag


def test_bad_flag_values_are_refused_with_a_message() -> None:
    proc = subprocess.run(
        [*AGENT_CMD, "--service", "web", "--outbound", "nohost"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "'nohost' is not host:port" in proc.stderr


def test_importing_the_agent_pulls_in_no_control_plane_dependencies() -> None:
    code = (
        "import sys, mesh_agent, mesh_agent.__main__, mesh_agent.protocol, mesh_agent.proxy, "
        "mesh_agent.control, mesh_agent.admin, mesh_agent.telemetry\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('fastapi', 'sqlalchemy', 'networkx', 'jinja2', 'app', 'starlette', 'alembic')]\n"
        "print(','.join(sorted(bad)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == ""


def test_serves_and_restarts_from_the_persisted_config(
    agent: AgentProcess, backend: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "agent.json"
    cfg.write_text(_config(backend))
    proc = agent.start("--config", str(cfg))
    assert agent.get("/ready").status_code == 200
    version = agent.get("/config").json()["version"]
    assert agent.call("reviews").text == "backend"

    proc.kill()
    proc.wait(timeout=10)
    cfg.unlink()  # the control plane / config file is gone: only the state dir is left

    agent.start()
    assert agent.get("/ready").status_code == 200
    doc = agent.get("/config").json()
    assert doc["version"] == version
    assert doc["source"].startswith("state:")
    assert agent.call("reviews").text == "backend"


def test_sighup_reload_and_rejected_config(
    agent: AgentProcess, backend: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(_config(backend) + " " * 200)  # room for the same-size edit below
    proc = agent.start("--config", str(cfg))
    v1 = agent.get("/config").json()["version"]

    # An invalid edit: rejected with the exact path; the old config keeps serving. The edit is
    # made invisible to the file watcher (same size, same mtime, same inode), so only SIGHUP
    # can make the agent read it.
    before = cfg.stat()
    invalid = (
        "services:\n- name: reviews\n  versions: {v1: {endpoints: ['" + backend + "']}}\n"
        "  routes: [{name: r, backends: [{version: v2}]}]\n"
    )
    assert len(invalid) <= before.st_size
    cfg.write_text(invalid + "#" * (before.st_size - len(invalid)))
    os.utime(cfg, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = cfg.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    doc = agent.get("/config").json()
    while doc["last_error"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
        doc = agent.get("/config").json()
    assert doc["last_error"] is not None, "SIGHUP did not make the agent read the file"
    assert doc["version"] == v1
    assert doc["last_error"]["issues"][0]["path"] == "services[0].routes[0].backends[0].version"
    assert agent.call("reviews").status_code == 200
    assert 'mesh_agent_config_updates_total{result="rejected"} 1' in agent.get("/metrics").text

    # a valid edit is picked up by the file watcher alone (no signal)
    cfg.write_text(_config(backend).replace('"reviews"', '"ratings"'))
    while agent.get("/config").json()["version"] == v1 and time.monotonic() < deadline + 10:
        time.sleep(0.05)
    doc = agent.get("/config").json()
    assert doc["last_error"] is None
    assert doc["config"]["services"][0]["name"] == "ratings"
    assert agent.call("ratings").status_code == 200
    assert agent.call("reviews").status_code == 404


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_large_upload_is_streamed_without_buffering(
    agent: AgentProcess, backend: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "agent.json"
    cfg.write_text(_config(backend))
    proc = agent.start("--config", str(cfg))
    assert agent.call("reviews").status_code == 200
    before = _peak_rss_kib(proc.pid)
    size = 50 * 1024 * 1024
    block = os.urandom(1 << 20)
    h = hashlib.sha256()
    for _ in range(size // len(block)):
        h.update(block)

    def body() -> Iterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    with socket.create_connection(("127.0.0.1", agent.outbound)):
        pass  # the listener is up; httpx below does the real work
    r = httpx.post(
        f"http://127.0.0.1:{agent.outbound}/upload",
        headers={"host": "reviews"},
        content=body(),
        timeout=60,
    )
    assert r.status_code == 200
    assert r.text == f"{size} {h.hexdigest()}"
    grown_mib = (_peak_rss_kib(proc.pid) - before) / 1024
    assert grown_mib < 25, f"peak RSS grew by {grown_mib:.1f} MiB for a 50 MiB body"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--otlp-endpoint", "ftp://collector"], "--otlp-endpoint: 'ftp://collector' is not"),
        (["--sampling-ratio", "1.5"], "--sampling-ratio: must be between 0 and 1"),
        (["--app", "127.0.0.1:0"], "--app: port 0 out of range 1-65535"),
        (["--admin", "nowhere"], "--admin: 'nowhere' is not host:port"),
    ],
)
def test_bad_flags_are_usage_errors_not_tracebacks(flags: list[str], message: str) -> None:
    result = subprocess.run(
        [*AGENT_CMD, "--service", "reviews", *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_listeners_on_port_zero_get_a_free_port(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            *AGENT_CMD,
            "--service",
            "reviews",
            "--outbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = ""
        deadline = time.monotonic() + 20
        while "listening" not in line and time.monotonic() < deadline:
            line = process.stderr.readline()
        admin = line.split("admin=", 1)[1].split()[0].rstrip(";")
        assert not admin.endswith(":0")
        ready = httpx.get(f"http://{admin}/ready", timeout=5)
        assert ready.status_code == 503  # up, but no config yet
    finally:
        process.terminate()
        process.wait(timeout=15)


class _Gated(_Echo):
    """``GET /slow`` waits until the test opens the gate; anything else answers at once."""

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            self.server.arrived.set()  # type: ignore[attr-defined]
            self.server.gate.wait(60)  # type: ignore[attr-defined]
        super().do_GET()


@pytest.fixture
def gated() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gated)
    server.daemon_threads = True
    server.name = b"gated"  # type: ignore[attr-defined]
    server.arrived = threading.Event()  # type: ignore[attr-defined]
    server.gate = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.gate.set()  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def _address_of(server: ThreadingHTTPServer) -> str:
    return f"127.0.0.1:{server.server_address[1]}"


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight_then_exits(
    agent: AgentProcess, gated: ThreadingHTTPServer, tmp_path: Path
) -> None:
    cfg = tmp_path / "agent.json"
    cfg.write_text(_config(_address_of(gated)))
    proc = agent.start("--config", str(cfg), "--drain-timeout", "30")
    thread, result = _in_thread(lambda: agent.call("reviews", "/slow"))
    assert gated.arrived.wait(10)  # type: ignore[attr-defined]
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not _refused(agent.outbound) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _refused(agent.outbound)  # no new connections once draining
    assert proc.poll() is None  # ... but still there for the request in flight
    gated.gate.set()  # type: ignore[attr-defined]
    thread.join(10)
    (response,) = result
    assert isinstance(response, httpx.Response)
    assert (response.status_code, response.text) == (200, "gated")
    assert proc.wait(timeout=10) == 0


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.mark.slow
def test_the_four_timeout_flags_reach_the_proxy(
    agent: AgentProcess, gated: ThreadingHTTPServer, tmp_path: Path
) -> None:
    """Each flag is set far below its default; every wait here is bounded well below the
    defaults (10 s and more), so a flag that is not wired through fails the test."""
    bound_s = 5.0
    cfg = tmp_path / "agent.json"
    cfg.write_text(_config(_address_of(gated)))
    proc = agent.start(
        "--config",
        str(cfg),
        "--header-timeout",
        "0.3",
        "--body-timeout",
        "0.3",
        "--idle-timeout",
        "0.3",
        "--drain-timeout",
        "0.3",
    )
    with socket.create_connection(("127.0.0.1", agent.outbound), timeout=bound_s) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: revi")  # --header-timeout
        assert _read_all(s).startswith(b"HTTP/1.1 408 ")
    with socket.create_connection(("127.0.0.1", agent.outbound), timeout=bound_s) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 10\r\n\r\nabc")
        assert _read_all(s) == b""  # --body-timeout: closed
    with socket.create_connection(("127.0.0.1", agent.outbound), timeout=bound_s) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
        answer = _read_all(s)  # --idle-timeout: answered, then closed while idle
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"gated")
    # --drain-timeout: a request that never ends does not keep the agent from exiting
    thread, _ = _in_thread(lambda: _swallow(lambda: agent.call("reviews", "/slow")))
    assert gated.arrived.wait(bound_s)  # type: ignore[attr-defined]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=bound_s) == 0
    gated.gate.set()  # type: ignore[attr-defined]
    thread.join(bound_s)


def _swallow(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except httpx.HTTPError as exc:
        return exc


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)  # a pip install into a fresh virtualenv: minutes on a busy machine
@pytest.mark.parametrize("compiled", [False, True], ids=["interpreted", "compiled"])
def test_the_agent_only_distribution_installs_and_proxies_without_the_control_plane(
    tmp_path: Path, backend: str, compiled: bool
) -> None:
    """``pip install ./agent`` into a fresh virtualenv: the sidecar runs and proxies, and none
    of the control plane's dependencies came with it. With ``MESH_AGENT_COMPILE=1`` the wheel
    carries the request path compiled (mypyc), and that is what runs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    build = tmp_path / "src"
    # Build from a copy so that the build leaves nothing behind in the repository (and finds
    # none of the development tree's own compiled modules).
    shutil.copytree(
        REPO / "agent",
        build,
        symlinks=False,
        ignore=shutil.ignore_patterns("*.so", "_native.built", "__pycache__", "build"),
    )
    env = {**os.environ, "MESH_AGENT_COMPILE": "1" if compiled else "0"}
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(build)],
        check=True,
        timeout=840,
        capture_output=True,
        env=env,
    )
    native = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib; from mesh_agent import native;"
            " [importlib.import_module(m) for m in native.NATIVE_MODULES];"
            " print(len(native.compiled_modules()), len(native.NATIVE_MODULES))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=tmp_path,
    )
    count, total = native.stdout.split()
    assert int(count) == (int(total) if compiled else 0)
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u; print([m for m in ('fastapi', 'sqlalchemy', 'psycopg',"
            " 'jinja2', 'starlette', 'alembic', 'networkx', 'app') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=tmp_path,  # not the repository root, whose packages `python -c` would see
    )
    assert probe.stdout.strip() == "[]"
    cfg = tmp_path / "agent.json"
    cfg.write_text(_config(backend))
    agent = AgentProcess(tmp_path, command=[str(venv / "bin" / "mesh-agent")])
    try:
        agent.start("--config", str(cfg))
        assert agent.call("reviews").text == "backend"
    finally:
        agent.stop_all()
