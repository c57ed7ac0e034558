"""Start and supervise the living demo: the control plane, the demo apps, one ``mesh-agent``
per app instance (and one for the load generator), all connected, on loopback ports.

Every child runs with its parent-death signal set, so even a killed runner leaves no process
behind; Ctrl-C stops them in order (agents first, so they deregister) and waits for each.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.demo.topology import DEMO_NAMESPACE, LOADGEN, SERVICES

__all__ = ["DemoError", "Supervisor", "plan_instances", "run_demo"]

PYTHON = sys.executable


class DemoError(Exception):
    """The demo cannot start; the message says why, in one line."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port(planned: set[int]) -> int:
    """A free loopback port *below* the kernel's ephemeral range. A port from bind(0) comes from
    that range, and between planning and an agent binding it, one of the demo's own outgoing
    connections could take it ("address already in use", seen in CI)."""
    high = _ephemeral_low() - 1
    low = max(1024, high - 20_000)
    for _ in range(2000):
        port = random.randint(low, high)
        if port in planned:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        planned.add(port)
        return port
    with socket.socket() as probe:  # a crowded machine: whatever the kernel gives
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


@dataclass(frozen=True)
class PlannedInstance:
    service: str
    version: str
    app_port: int  # 0: no app (the load generator)
    inbound: int
    outbound: int
    admin: int
    replica: int = 1

    @property
    def key(self) -> str:
        suffix = f"-{self.replica}" if self.replica > 1 else ""
        return f"{self.service}-{self.version}{suffix}"


def plan_instances() -> list[PlannedInstance]:
    ports: set[int] = set()

    def port() -> int:
        return _free_port(ports)

    planned = [
        PlannedInstance(s.name, v, port(), port(), port(), port(), n)
        for s in SERVICES
        for v in s.versions
        for n in range(1, s.replicas + 1)
    ]
    planned.append(PlannedInstance(LOADGEN.name, "v1", 0, 0, port(), port()))
    return planned


def _apps_command(rps: float, instances: list[PlannedInstance]) -> list[str]:
    return [
        PYTHON, "-m", "app.demo.apps", "--rps", str(rps),
        *(
            arg
            for i in instances
            for arg in ("--instance", f"{i.service}:{i.version}:{i.app_port}:{i.outbound}")
        ),
    ]  # fmt: skip


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # PR_SET_PDEATHSIG: the kernel sends SIGTERM to the child if the runner dies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Supervisor:
    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(  # noqa: S603 (commands built from our own table)
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                preexec_fn=_die_with_parent,
            )
        self.children.append((name, proc))
        return proc

    def exited(self) -> tuple[str, int] | None:
        for name, proc in self.children:
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def all_exited(self) -> list[tuple[str, int]]:
        return [(name, code) for name, proc in self.children if (code := proc.poll()) is not None]

    def stop_all(self, timeout_s: float = 15.0) -> None:
        # Reverse order: agents deregister while the control plane still listens.
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc in reversed(self.children):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.children.clear()


def _wait_http(url: str, supervisor: Supervisor, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        gone = supervisor.exited()
        if gone is not None:
            raise DemoError(f"{gone[0]} exited with code {gone[1]} (see {supervisor.logs})")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 (our own loopback URL)
                return
        except OSError:
            time.sleep(0.1)
    raise DemoError(f"{url} did not answer within {limit_s:.0f} s (see {supervisor.logs})")


def _write_private(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text + "\n")


def run_demo(
    settings: Settings,
    *,
    rps: float,
    echo: Callable[[str], None],
    prepare_database: Callable[[Settings], None],
) -> int:
    from app.agents.token import JoinToken
    from app.audit.trust import build_audit_trust
    from app.db import Database, session_scope
    from app.demo.seed import NEWCOMER, seed_demo_catalog, seed_demo_people

    host, port = settings.host, settings.port
    if port_in_use(host, port):
        raise DemoError(
            f"port {port} on {host} is already in use by another program; "
            "stop it or choose another port (--port or MESH_PORT)"
        )
    home = settings.data_dir / "demo"
    # A fresh mesh each run: no agents, changes or state files left from the last one.
    for stale in ("agents", "logs"):
        shutil.rmtree(home / stale, ignore_errors=True)
    if not settings.database_url:
        for suffix in ("", "-wal", "-shm"):
            (home / f"demo.db{suffix}").unlink(missing_ok=True)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    database_url = settings.database_url or f"sqlite:///{home / 'demo.db'}"
    settings = settings.model_copy(update={"database_url": database_url})
    prepare_database(settings)
    database = Database(settings.effective_database_url)
    try:
        for session in session_scope(database, write=True):
            seed_demo_catalog(session)
            access = seed_demo_people(session)
        # Sign the seed's events now: the control plane's checkpointer was not listening yet.
        build_audit_trust(settings, database).checkpointer.checkpoint_quietly()
    finally:
        database.dispose()
    token = JoinToken(settings.effective_join_token_file).ensure()

    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    sign_in_url = f"{url}/sign-in/link/{access.sign_in_secret}"
    # Also in files (0600), for scripts and tests that drive the demo.
    _write_private(home / "sign-in-link", sign_in_url)
    _write_private(home / "token", access.api_token)
    env = {
        **os.environ,
        "MESH_DATABASE_URL": database_url,
        "MESH_DATA_DIR": str(settings.data_dir),
        "MESH_HOST": host,
        "MESH_PORT": str(port),
    }
    supervisor = Supervisor(home / "logs", env)
    stop = {"signal": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        supervisor.start("control-plane", [PYTHON, "-m", "app", "serve", "--no-migrate"])
        _wait_http(f"{url}/healthz", supervisor)
        instances = plan_instances()
        # The first replica of every app shares one process, to stay light; a further replica
        # gets a process of its own, so that it can be killed alone and the mesh seen to
        # route around it; the load generator too, so that its cost can be told apart.
        supervisor.start(
            "apps",
            _apps_command(
                rps, [i for i in instances if i.replica == 1 and i.service != LOADGEN.name]
            ),
        )
        for i in instances:
            if i.replica > 1 or i.service == LOADGEN.name:
                supervisor.start(f"app-{i.key}", _apps_command(rps, [i]))
        for i in instances:
            cmd = [
                PYTHON, "-m", "mesh_agent",
                "--service", i.service, "--version", i.version, "--namespace", DEMO_NAMESPACE,
                "--outbound", f"127.0.0.1:{i.outbound}", "--admin", f"127.0.0.1:{i.admin}",
                "--control-plane", url, "--token", token,
                "--state-dir", str(home / "agents" / i.key),
                "--otlp-endpoint", url, "--sampling-ratio", "0.2", "--log-level", "warning",
            ]  # fmt: skip
            if i.app_port:
                cmd += ["--app", f"127.0.0.1:{i.app_port}", "--inbound", f"127.0.0.1:{i.inbound}"]
            supervisor.start(f"agent-{i.key}", cmd)
        for i in instances:
            _wait_http(f"http://127.0.0.1:{i.admin}/config", supervisor)
        echo(
            f"mesh demo: {len(SERVICES)} services, {len(instances)} agents, about {rps:g} "
            f"requests/s of traffic\n"
            f"  console  {url}   (topology, traffic, agents, traces)\n"
            f"  sign in  {sign_in_url}\n"
            f"           (one-time link, as {NEWCOMER}, an admin of this demo mesh)\n"
            f"  logs     {home / 'logs'}\n"
            f"  try      MESH_TOKEN=$(cat {home / 'token'}) meshctl canary catalog "
            f"-n {DEMO_NAMESPACE} --weights v1=50,v2=50 --reason 'more canary' --server {url}\n"
            "Ctrl-C stops everything."
        )
        reported: set[str] = set()
        while not stop["signal"]:
            for name, code in supervisor.all_exited():
                if name == "control-plane":
                    echo(
                        f"mesh demo: {name} exited with code {code}; stopping (logs in "
                        f"{home / 'logs'})"
                    )
                    return 1
                if name not in reported:
                    # A killed demo service is a fault to watch, not the end of the demo: its
                    # callers' edges show the errors and their agents route around it.
                    reported.add(name)
                    echo(f"mesh demo: {name} exited with code {code}; the rest keeps running")
            time.sleep(0.2)
        echo("mesh demo: stopping")
        return 0
    finally:
        supervisor.stop_all()
        for s, handler in previous.items():
            signal.signal(s, handler)
