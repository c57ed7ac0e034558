"""Proxy benchmark: mesh-agent beside nginx and HAProxy, all measured in the same run.

    .venv/bin/python bench/proxy.py [--json out.json] [--duration S] [--rows direct,agent,...]

Rows (each path ends at the same backend, an nginx `return 200 "ok"` on loopback):

- direct    client → backend
- agent     client → inbound agent → backend                           (one hop)
- mesh      client → outbound agent → inbound agent → backend          (two hops)
- nginx     client → nginx (1 worker, upstream keepalive) → backend     (one hop)
- nginx2    client → nginx → nginx → backend                           (two hops: the peer of mesh)
- haproxy   client → HAProxy (nbthread 1, http-reuse always) → backend  (one hop)

Columns: max throughput (wrk, one thread, keep-alive, N connections), the ratio to nginx, p50/p99
latency at a fixed rate (1,000 rps by default), the p99 each hop adds over `direct`, and the agents'
peak RSS and CPU during the throughput run.

Debian has no wrk2, and plain wrk is closed-loop (its latencies hide queueing: coordinated
omission). The fixed-rate columns therefore come from the open-loop generator in this file: one
select() loop on keep-alive connections that sends on a fixed schedule and times each response
from the moment its request was *due*, so a stalled proxy shows up in the tail. Its own
scheduling lag is printed so the noise floor is visible.

Everything runs on loopback, from temporary directories, and is stopped at exit, on error and on
Ctrl-C. The numbers are relative: every process shares the same two cores with the load generator.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httptools

from mesh_agent.native import NATIVE_MODULES

T = TypeVar("T")
VENV_BIN = Path(sys.executable).parent
DEST_SERVICE = "backend"  # the destination's mesh name; requests carry it as Host
ALL_ROWS = ("direct", "agent", "mesh", "nginx", "nginx2", "haproxy")
HOPS = {"direct": 0, "agent": 1, "mesh": 2, "nginx": 1, "nginx2": 2, "haproxy": 1}
# Each row's throughput is compared with nginx over the same number of hops.
PEER = {"agent": "nginx", "mesh": "nginx2", "haproxy": "nginx", "nginx2": "nginx2"}
TARGET_RATIO = 0.65
TARGET_ADDED_P99_MS = 1.0
TARGET_RSS_MB = 40.0  # with tracing on (the default here)
TARGET_RSS_NO_TRACING_MB = 30.0  # with --no-otlp
QUIET_PERCENT = 15.0  # outside CPU use (100 % = one core) below which a measurement starts
DISTURBED_PERCENT = 25.0  # outside CPU use during a measurement above which it is repeated


# ---------------------------------------------------------------------------------------------
# Processes: every child gets its own process group, so nginx's and haproxy's workers die too.


class Children:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logs: dict[str, Path] = {}

    def start(
        self, name: str, argv: list[str], log_dir: Path, **kw: Any
    ) -> subprocess.Popen[bytes]:
        log = log_dir / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **kw,
            )
        self.procs.append((name, proc))
        return proc

    def groups(self) -> set[int]:
        return {proc.pid for _, proc in self.procs}  # each child leads its own group

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            text = self.logs[name].read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str = "/", host: str = DEST_SERVICE) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore HTTP_PROXY
    try:
        with opener.open(request, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ok(port: int, children: Children, what: str, timeout: float = 15.0) -> None:
    """Wait until `port` answers 200 for the destination; a proxy's 503 is not ready."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        children.check_alive()
        try:
            status, body = http_get(port)
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{what} on port {port} not ready after {timeout}s ({last})")


# ---------------------------------------------------------------------------------------------
# The peers


NGINX_COMMON = """
worker_processes 1;
pid {tmp}/{name}.pid;
error_log stderr warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/{name}-body;
    proxy_temp_path {tmp}/{name}-proxy;
    fastcgi_temp_path {tmp}/{name}-fastcgi;
    uwsgi_temp_path {tmp}/{name}-uwsgi;
    scgi_temp_path {tmp}/{name}-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    {body}
}}
"""

BACKEND = """
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 "ok"; }}
    }}
"""

NGINX_PROXY = """
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 128;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""

HAPROXY = """
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 127.0.0.1:{backend}
"""


def start_nginx(children: Children, tmp: Path, name: str, body: str) -> None:
    conf = tmp / f"{name}.conf"
    conf.write_text(NGINX_COMMON.format(tmp=tmp, name=name, body=body))
    children.start(
        name, ["nginx", "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"], tmp, cwd=tmp
    )


def start_haproxy(children: Children, tmp: Path, port: int, backend: int) -> None:
    conf = tmp / "haproxy.cfg"
    conf.write_text(HAPROXY.format(port=port, backend=backend))
    children.start("haproxy", ["haproxy", "-db", "-f", str(conf)], tmp)


# ---------------------------------------------------------------------------------------------
# mesh-agent, through its real CLI


def mesh_agent_bin() -> str | None:
    candidate = VENV_BIN / "mesh-agent"
    if candidate.exists():
        return str(candidate)
    return shutil.which("mesh-agent")


def agent_help(binary: str) -> str:
    out = subprocess.run(
        [binary, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    return out.stdout + out.stderr


def agent_config(path: Path, services: dict[str, list[int]]) -> None:
    """The agent's YAML schema (see examples/agent-config.yaml): services → versions → endpoints."""
    lines = ["services:"]
    for name, ports in services.items():
        lines += [f"  - name: {name}", "    versions:", "      v1:", "        endpoints:"]
        lines += [f'          - "127.0.0.1:{p}"' for p in ports]
    if not services:
        lines = ["services: []"]
    path.write_text("\n".join(lines) + "\n")


def start_agent(
    children: Children,
    tmp: Path,
    binary: str,
    *,
    name: str,
    service: str,
    inbound: int,
    app: int,
    outbound: int,
    admin: int,
    services: dict[str, list[int]],
    extra: list[str],
    interpreted: bool = False,
) -> subprocess.Popen[bytes]:
    config = tmp / f"{name}.yaml"
    agent_config(config, services)
    state = tmp / f"{name}-state"
    state.mkdir(exist_ok=True)
    argv = [
        binary,
        "--service",
        service,
        "--inbound",
        f"127.0.0.1:{inbound}",
        "--app",
        f"127.0.0.1:{app}",
        "--outbound",
        f"127.0.0.1:{outbound}",
        "--admin",
        f"127.0.0.1:{admin}",
        "--config",
        str(config),
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    if interpreted:
        env["MESH_AGENT_INTERPRETED"] = "1"
    return children.start(name, argv, tmp, env=env, cwd=state)


def agent_extra_flags(help_text: str, state_dir: Path, otlp: str | None) -> list[str]:
    """Optional flags, passed only when this mesh-agent has them. The sampling ratio is left at
    the agent's default on purpose: the benchmark measures the agent as it ships."""
    extra: list[str] = []
    if "--state-dir" in help_text:
        extra += ["--state-dir", str(state_dir)]
    if otlp and "--otlp-endpoint" in help_text:
        extra += ["--otlp-endpoint", otlp]
    return extra


def start_otlp_sink(children: Children, tmp: Path) -> str:
    port = free_port()
    sink = Path(__file__).resolve().parent / "_backends" / "otlp_sink.py"
    children.start("otlp-sink", [sys.executable, str(sink), str(port)], tmp)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children.check_alive()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return f"http://127.0.0.1:{port}"
        time.sleep(0.05)
    raise RuntimeError("OTLP sink did not start")


def otlp_counts(url: str | None) -> dict[str, int] | None:
    if url is None:
        return None
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url + "/count", timeout=5) as response:
            counts: dict[str, int] = json.loads(response.read())
            return counts
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Measurements


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        return _ticks(f.read()) / CLK_TCK


def _ticks(stat_line: str) -> int:
    fields = stat_line.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def busy_ticks() -> int:
    """CPU ticks the whole machine spent busy (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]  # minus idle and iowait


def own_ticks(groups: set[int]) -> int:
    """Ticks of this bench: itself, reaped children (wrk) and every process in our groups."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    total = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                line = f.read()
        except OSError:
            continue
        if int(line.rsplit(")", 1)[1].split()[2]) in groups:  # field 5: process group
            total += _ticks(line)
    return total


def foreign_cpu_percent(groups: set[int], seconds: float) -> float:
    busy0, own0 = busy_ticks(), own_ticks(groups)
    time.sleep(seconds)
    foreign = (busy_ticks() - busy0) - (own_ticks(groups) - own0)
    return max(0.0, 100 * foreign / CLK_TCK / seconds)


def wait_quiet(groups: set[int], limit_s: float, log: Callable[[str], None]) -> None:
    """The cores are shared (other work, other users): wait a little for a quiet moment."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        busy = foreign_cpu_percent(groups, 0.5)
        if busy < QUIET_PERCENT:
            return
        log(f"  machine busy with other work ({busy:.0f} % CPU), waiting")
        time.sleep(1.0)


class Sampler:
    """Peak RSS and CPU of the agents while a measurement runs, and how busy the machine was
    with work that is not this benchmark (other users of the shared cores)."""

    def __init__(self, pids: list[int], groups: set[int]) -> None:
        self.pids = pids
        self.groups = groups
        self.peak = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for pid in self.pids:
                with contextlib.suppress(OSError):
                    self.peak[pid] = max(self.peak[pid], rss_mb(pid))

    def __enter__(self) -> Sampler:
        self._cpu0 = {p: cpu_seconds(p) for p in self.pids}
        self._busy0, self._own0 = busy_ticks(), own_ticks(self.groups)
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        elapsed = time.monotonic() - self._t0
        self.cpu_percent = {p: 100 * (cpu_seconds(p) - self._cpu0[p]) / elapsed for p in self.pids}
        foreign = (busy_ticks() - self._busy0) - (own_ticks(self.groups) - self._own0)
        self.other_cpu_percent = max(0.0, 100 * foreign / CLK_TCK / elapsed)


_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def wrk(port: int, connections: int, duration: float) -> tuple[float, int, str]:
    """Max throughput: (requests/s, errors, raw output)."""
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "-H",
        f"Host: {DEST_SERVICE}",
        f"http://127.0.0.1:{port}/",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True)
    rps = float(m.group(1)) if (m := _WRK_RPS.search(out.stdout)) else 0.0
    errors = int(m.group(1)) if (m := _WRK_NON2XX.search(out.stdout)) else 0
    if m := _WRK_SOCKET.search(out.stdout):
        errors += sum(int(g) for g in m.groups())
    return rps, errors, out.stdout


@dataclass
class FixedRate:
    rate: float
    sent: int = 0
    completed: int = 0
    errors: int = 0
    achieved_rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    max_ms: float = 0.0
    schedule_lag_p99_ms: float = 0.0  # how late the generator itself sent (its noise floor)


class _Response:
    """httptools callbacks for one connection."""

    def __init__(self) -> None:
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def fixed_rate(port: int, rate: float, duration: float, connections: int) -> FixedRate:
    """Open-loop load: request i is due at start + i/rate whatever happened to request i-1.

    Latency is measured from the due time, not the send time, so time spent waiting for a free
    connection (the proxy is slow) counts, as with wrk2. select() is used rather than epoll for
    its microsecond timeout: epoll's millisecond timeout would add up to 1 ms of false latency.
    """
    request = f"GET / HTTP/1.1\r\nHost: {DEST_SERVICE}\r\n\r\n".encode()
    sel = selectors.SelectSelector()
    socks: list[socket.socket] = []
    states: list[_Response] = []
    parsers: list[Any] = []

    def connect(c: int) -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        state = _Response()
        if c < len(socks):
            sel.unregister(socks[c])
            socks[c].close()
            socks[c], states[c], parsers[c] = s, state, httptools.HttpResponseParser(state)
        else:
            socks.append(s)
            states.append(state)
            parsers.append(httptools.HttpResponseParser(state))
        sel.register(s, selectors.EVENT_READ, c)

    for c in range(connections):
        connect(c)
    free: deque[int] = deque(range(connections))
    due_of: dict[int, float] = {}
    latencies: list[float] = []
    lags: list[float] = []
    result = FixedRate(rate=rate)
    total = int(rate * duration)
    interval = 1.0 / rate
    clock = time.perf_counter
    start = clock() + 0.01
    hard_stop = start + duration + 10.0
    i = 0
    try:
        while True:
            now = clock()
            while i < total and free and start + i * interval <= now:
                c = free.popleft()
                due = start + i * interval
                socks[c].sendall(request)  # ~40 bytes into an empty socket buffer
                due_of[c] = due
                lags.append(now - due)
                i += 1
            if (i >= total and not due_of) or now > hard_stop:
                break
            # Sleep until the next request is due, or, with none due or no free connection,
            # until a response arrives.
            timeout = max(0.0, start + i * interval - clock()) if i < total and free else 0.05
            for key, _ in sel.select(timeout):
                c = key.data
                try:
                    data = socks[c].recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                try:
                    if not data:
                        raise ConnectionResetError("closed by the proxy")
                    parsers[c].feed_data(data)
                except (ConnectionResetError, httptools.HttpParserError):
                    # The request in flight is lost (counted as an error: sent, never
                    # completed); carry on with a fresh connection.
                    due_of.pop(c, None)
                    connect(c)
                    free.append(c)
                    continue
                if states[c].done:
                    done = clock()
                    states[c].done = False
                    if parsers[c].get_status_code() != 200:
                        result.errors += 1
                    latencies.append(done - due_of.pop(c))
                    free.append(c)
    finally:
        sel.close()
        for s in socks:
            s.close()
    elapsed = clock() - start
    latencies.sort()
    lags.sort()
    result.sent = i
    result.completed = len(latencies)
    result.errors += i - len(latencies)
    result.achieved_rps = len(latencies) / elapsed if elapsed > 0 else 0.0
    result.p50_ms = percentile(latencies, 0.50) * 1e3
    result.p90_ms = percentile(latencies, 0.90) * 1e3
    result.p99_ms = percentile(latencies, 0.99) * 1e3
    result.p999_ms = percentile(latencies, 0.999) * 1e3
    result.max_ms = (latencies[-1] if latencies else float("nan")) * 1e3
    result.schedule_lag_p99_ms = percentile(lags, 0.99) * 1e3
    return result


# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    path: str
    port: int
    hops: int
    agent_pids: list[int] = field(default_factory=list)
    # One entry per round; the summary fields below are medians over rounds.
    rps_runs: list[float] = field(default_factory=list)
    fixed_runs: list[FixedRate] = field(default_factory=list)
    other_cpu_runs: list[float] = field(default_factory=list)
    wrk_errors: int = 0
    max_rps: float | None = None
    ratio_vs_nginx: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    added_p99_per_hop_ms: float | None = None
    agent_rss_mb: list[float] = field(default_factory=list)
    agent_cpu_percent: list[float] = field(default_factory=list)
    agent_requests_counted: int | None = None
    note: str = ""

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text


def agent_metrics(admin_port: int) -> str | None:
    """The agent's admin /metrics text (None if it cannot be read)."""
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{admin_port}/metrics", timeout=5
        ) as response:
            return str(response.read().decode())
    except OSError:
        return None


def requests_counted(metrics: str) -> int:
    """Requests the agent's /metrics has counted: proof that metrics were on."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("mesh_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def compiled_count(metrics: str) -> int | None:
    """How many of the agent's request-path modules run compiled (mypyc)."""
    for line in metrics.splitlines():
        if line.startswith("mesh_agent_compiled_modules "):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    header = (
        f"{'path':<48} {'max rps':>8} {'vs nginx':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'+p99/hop':>8} {'RSS MB':>7} {'CPU %':>7} {'others %':>8}"
    )
    print()
    print(
        f"max rps: wrk -t1 -c{args.connections} -d{args.duration:g}s; latency: {args.rate:g} rps "
        f"for {args.latency_duration:g}s open loop on {args.latency_connections} keep-alive "
        f"connections (this script's generator; no wrk2 in Debian); "
        f"median of {args.rounds} interleaved rounds"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        rss = "/".join(f"{x:.0f}" for x in r.agent_rss_mb) or "-"
        cpu = "/".join(f"{x:.0f}" for x in r.agent_cpu_percent) or "-"
        others = max(r.other_cpu_runs) if r.other_cpu_runs else None
        print(
            f"{r.path:<48} {fmt(r.max_rps, '8.0f'):>8} {fmt(r.ratio_vs_nginx, '8.0%'):>8} "
            f"{fmt(r.p50_ms, '7.3f'):>7} {fmt(r.p99_ms, '7.3f'):>7} "
            f"{fmt(r.added_p99_per_hop_ms, '+8.3f'):>8} {rss:>7} {cpu:>7} "
            f"{fmt(others, '8.0f'):>8}" + (f"  ({r.note})" if r.note else "")
        )
    direct = next((r for r in rows if r.name == "direct" and r.fixed_runs), None)
    print(
        "vs nginx: throughput over nginx's over as many hops (nginx for one hop, "
        "nginx → nginx for two).\n"
        "+p99/hop: (p99 - direct p99) / hops.  RSS (peak) and CPU: the agents during wrk "
        "(outbound/inbound for the two-hop row).\n"
        "others %: CPU used by processes outside this benchmark during its measurements "
        f"(worst run kept, 100 % = one core); runs above {DISTURBED_PERCENT:g} % are repeated "
        f"up to {args.retries} times, the least disturbed kept; high values mean noisy figures."
    )
    if direct:
        lag = statistics.median(f.schedule_lag_p99_ms for f in direct.fixed_runs)
        print(f"generator noise floor: p99 send lag {lag:.3f} ms")


def targets(rows: list[Row], no_tracing: bool = False) -> list[dict[str, Any]]:
    by = {r.name: r for r in rows}
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, ok: bool | None, unit: str) -> None:
        out.append({"target": name, "value": value, "limit": limit, "unit": unit, "met": ok})

    for name, label in (("agent", "nginx, one hop"), ("mesh", "nginx → nginx, two hops")):
        r = by.get(name)
        ratio = r.ratio_vs_nginx if r else None
        add(
            f"{name} throughput >= {TARGET_RATIO:.0%} of {label}",
            ratio,
            TARGET_RATIO,
            None if ratio is None else ratio >= TARGET_RATIO,
            "ratio",
        )
    for name in ("agent", "mesh"):
        r = by.get(name)
        added = r.added_p99_per_hop_ms if r else None
        add(
            f"added p99 per hop <= 1 ms at 1,000 rps ({name})",
            added,
            TARGET_ADDED_P99_MS,
            None if added is None else added <= TARGET_ADDED_P99_MS,
            "ms",
        )
    rss = [x for n in ("agent", "mesh") if (r := by.get(n)) for x in r.agent_rss_mb]
    peak = max(rss) if rss else None
    limit = TARGET_RSS_NO_TRACING_MB if no_tracing else TARGET_RSS_MB
    add(
        f"agent RSS under load <= {limit:g} MB ({'no tracing' if no_tracing else 'tracing on'})",
        peak,
        limit,
        None if peak is None else peak <= limit,
        "MB",
    )
    return out


def print_targets(result: list[dict[str, Any]]) -> None:
    print()
    print("targets:")
    for t in result:
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
        value = (
            "-"
            if t["value"] is None
            else (f"{t['value']:.0%}" if t["unit"] == "ratio" else f"{t['value']:.3f} {t['unit']}")
        )
        print(f"  {t['target']:<52} {value:>12}  {verdict}")


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(__doc__ or "").split("\n\n", 1)[1],
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (5)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    p.add_argument("--rate", type=float, default=1000.0, help="fixed rate in rps (1000)")
    p.add_argument(
        "--latency-duration", type=float, default=5.0, help="seconds at that rate per round (5)"
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, medians (3)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="before each measurement wait up to this many seconds for other CPU use to drop "
        f"below {QUIET_PERCENT:g} %% (15)",
    )
    p.add_argument("--latency-connections", type=int, default=16)
    p.add_argument("--rows", default=",".join(ALL_ROWS), help=f"subset of {','.join(ALL_ROWS)}")
    p.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every mesh-agent (repeatable)",
    )
    p.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="keep everything up this many seconds after start-up (for profiling by hand)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help=f"repeat a measurement disturbed by over {DISTURBED_PERCENT:g} %% outside CPU (2)",
    )
    p.add_argument(
        "--no-otlp",
        action="store_true",
        help="do not give the agents an OTLP endpoint (by default a local sink receives spans)",
    )
    p.add_argument(
        "--interpreted",
        action="store_true",
        help="run the agents interpreted where a compiled build exists (MESH_AGENT_INTERPRETED)",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the logs")
    args = p.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = set(args.rows) - set(ALL_ROWS)
    if unknown:
        p.error(f"unknown rows: {', '.join(sorted(unknown))}")
    return args


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so the finally block stops every child."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(args: argparse.Namespace) -> dict[str, Any]:
    for tool in ("wrk", "nginx", "haproxy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y nginx haproxy wrk")
    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    tmp.chmod(0o755)  # nginx workers drop to `nobody` when started as root
    children = Children()
    rows: list[Row] = []
    spans: dict[str, int] | None = None
    compiled: int | None = None
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        backend = free_port()
        start_nginx(children, tmp, "backend", BACKEND.format(port=backend))
        wait_ok(backend, children, "backend nginx")
        rows.append(Row("direct", "direct → backend", backend, 0))

        if "nginx" in args.rows:
            port = free_port()
            start_nginx(children, tmp, "nginx", NGINX_PROXY.format(port=port, backend=backend))
            wait_ok(port, children, "nginx proxy")
            rows.append(Row("nginx", "nginx (1 worker, upstream keepalive)", port, 1))
        if "nginx2" in args.rows:
            second, first = free_port(), free_port()
            start_nginx(children, tmp, "nginx2b", NGINX_PROXY.format(port=second, backend=backend))
            start_nginx(children, tmp, "nginx2a", NGINX_PROXY.format(port=first, backend=second))
            wait_ok(first, children, "nginx → nginx")
            rows.append(Row("nginx2", "nginx → nginx (two hops)", first, 2))
        if "haproxy" in args.rows:
            port = free_port()
            start_haproxy(children, tmp, port, backend)
            wait_ok(port, children, "haproxy")
            rows.append(Row("haproxy", "HAProxy (nbthread 1, http-reuse always)", port, 1))

        wanted_agents = [r for r in ("agent", "mesh") if r in args.rows]
        binary = mesh_agent_bin() if wanted_agents else None
        admin_of: dict[str, int] = {}
        otlp: str | None = None
        if wanted_agents and binary is None:
            for name in wanted_agents:
                rows.append(Row(name, name, 0, HOPS[name], note="mesh-agent not installed"))
        elif wanted_agents and binary is not None:
            help_text = agent_help(binary)
            otlp = None if args.no_otlp else start_otlp_sink(children, tmp)
            if "agent" in args.rows:
                inbound, admin = free_port(), free_port()
                proc = start_agent(
                    children,
                    tmp,
                    binary,
                    name="agent",
                    service=DEST_SERVICE,
                    inbound=inbound,
                    app=backend,
                    outbound=free_port(),
                    admin=admin,
                    services={},
                    extra=agent_extra_flags(help_text, tmp / "agent-state", otlp) + args.agent_arg,
                    interpreted=args.interpreted,
                )
                admin_of["agent"] = admin
                row = Row("agent", "agent: inbound → backend", inbound, 1, [proc.pid])
                try:
                    wait_ok(inbound, children, "inbound agent")
                except RuntimeError as exc:
                    row.note = f"agent not ready: {exc}"
                    row.port = 0
                rows.append(row)
            if "mesh" in args.rows:
                b_in, b_admin, a_out, a_admin = (free_port() for _ in range(4))
                proc_b = start_agent(
                    children,
                    tmp,
                    binary,
                    name="mesh-inbound",
                    service=DEST_SERVICE,
                    inbound=b_in,
                    app=backend,
                    outbound=free_port(),
                    admin=b_admin,
                    services={},
                    extra=agent_extra_flags(help_text, tmp / "b-state", otlp) + args.agent_arg,
                    interpreted=args.interpreted,
                )
                proc_a = start_agent(
                    children,
                    tmp,
                    binary,
                    name="mesh-outbound",
                    service="client",
                    inbound=free_port(),
                    app=free_port(),
                    outbound=a_out,
                    admin=a_admin,
                    services={DEST_SERVICE: [b_in]},
                    extra=agent_extra_flags(help_text, tmp / "a-state", otlp) + args.agent_arg,
                    interpreted=args.interpreted,
                )
                admin_of["mesh"] = a_admin
                row = Row(
                    "mesh",
                    "mesh: outbound agent → inbound agent → backend",
                    a_out,
                    2,
                    [proc_a.pid, proc_b.pid],
                )
                try:
                    wait_ok(b_in, children, "inbound agent (mesh)")
                    wait_ok(a_out, children, "outbound agent (mesh)")
                except RuntimeError as exc:
                    row.note = f"agents not ready: {exc}"
                    row.port = 0
                rows.append(row)

        order = {name: i for i, name in enumerate(ALL_ROWS)}
        rows.sort(key=lambda r: order[r.name])
        live = [r for r in rows if r.port]
        if args.hold:
            log(f"holding for {args.hold:g}s: " + ", ".join(f"{r.name}={r.port}" for r in live))
            time.sleep(args.hold)

        # Rounds interleave the rows, so a burst of outside load spreads over all of them
        # instead of spoiling one; each figure is the median over rounds.
        def measure(run: Callable[[], T], pids: list[int]) -> tuple[T, Sampler]:
            """Run once in a quiet moment; repeat a run that outside load disturbed anyway
            (up to --retries times) and keep the least disturbed one."""
            best: tuple[T, Sampler] | None = None
            for attempt in range(args.retries + 1):
                wait_quiet(children.groups(), args.quiet_wait, log)
                with Sampler(pids, children.groups()) as sampler:
                    result = run()
                if best is None or sampler.other_cpu_percent < best[1].other_cpu_percent:
                    best = (result, sampler)
                if sampler.other_cpu_percent < DISTURBED_PERCENT:
                    break
                if attempt < args.retries:
                    log(f"  disturbed ({sampler.other_cpu_percent:.0f} % outside CPU), again")
            assert best is not None
            return best

        for round_no in range(1, args.rounds + 1):
            for r in live:
                children.check_alive()
                log(f"[round {round_no}] {r.name}: wrk -c{args.connections} {args.duration:g}s")
                if round_no == 1:
                    wrk(r.port, args.connections, 1.0)  # warm-up: pools, caches, allocator
                (rps, errors, _), sampler = measure(
                    partial(wrk, r.port, args.connections, args.duration), r.agent_pids
                )
                r.rps_runs.append(rps)
                r.wrk_errors += errors
                r.other_cpu_runs.append(sampler.other_cpu_percent)
                r.agent_rss_mb = [
                    max(old, sampler.peak[p])
                    for old, p in zip(
                        r.agent_rss_mb or [0.0] * len(r.agent_pids), r.agent_pids, strict=True
                    )
                ]
                r.agent_cpu_percent = [sampler.cpu_percent[p] for p in r.agent_pids]
        for round_no in range(1, args.rounds + 1):
            for r in live:
                children.check_alive()
                log(
                    f"[round {round_no}] {r.name}: {args.rate:g} rps for {args.latency_duration:g}s"
                )
                fixed_rate(r.port, args.rate, 0.5, args.latency_connections)  # warm-up
                fixed, sampler = measure(
                    partial(
                        fixed_rate,
                        r.port,
                        args.rate,
                        args.latency_duration,
                        args.latency_connections,
                    ),
                    [],
                )
                r.fixed_runs.append(fixed)
                r.other_cpu_runs.append(sampler.other_cpu_percent)

        for r in live:
            r.max_rps = statistics.median(r.rps_runs)
            r.p50_ms = statistics.median(f.p50_ms for f in r.fixed_runs)
            r.p99_ms = statistics.median(f.p99_ms for f in r.fixed_runs)
            if r.wrk_errors:
                r.add_note(f"{r.wrk_errors} errors under wrk")
            if fixed_errors := sum(f.errors for f in r.fixed_runs):
                r.add_note(f"{fixed_errors} errors at fixed rate")
            if r.name in admin_of:
                metrics = agent_metrics(admin_of[r.name])
                if metrics is not None:
                    r.agent_requests_counted = requests_counted(metrics)
                    compiled = compiled_count(metrics)
                if not r.agent_requests_counted:
                    r.add_note("/metrics counted no requests")

        spans = otlp_counts(otlp)
        by = {r.name: r for r in rows}
        direct_p99 = by["direct"].p99_ms
        for r in live:
            peer = by.get(PEER.get(r.name, "nginx"))
            peer_rps = peer.max_rps if peer is not None else None
            if r.max_rps is not None and peer_rps:
                r.ratio_vs_nginx = r.max_rps / peer_rps
            if r.hops and r.p99_ms is not None and direct_p99 is not None:
                r.added_p99_per_hop_ms = (r.p99_ms - direct_p99) / r.hops
    finally:
        children.stop_all()
        if args.keep_logs:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print_table(rows, args)
    if admin_of:
        print(
            f"agents: request path compiled with mypyc ({compiled} of {len(NATIVE_MODULES)} "
            "modules; `make native`)"
            if compiled
            else "agents: request path interpreted (no `make native` build, or --interpreted)"
        )
    if spans is not None:
        print(
            f"tracing: agents at their default sampling ratio exported {spans['spans']} spans "
            f"in {spans['requests']} OTLP/HTTP requests to a local sink"
        )
    elif not args.no_otlp:
        print("tracing: no spans exported (no OTLP endpoint or sink)")
    result_targets = targets(rows, no_tracing=args.no_otlp)
    print_targets(result_targets)
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "settings": {
            "duration_s": args.duration,
            "wrk_connections": args.connections,
            "rate_rps": args.rate,
            "latency_duration_s": args.latency_duration,
            "latency_connections": args.latency_connections,
            "rounds": args.rounds,
            "latency_generator": "bench/proxy.py open-loop select() generator, "
            "latency from due time (no wrk2 in Debian)",
        },
        "rows": [asdict(r) for r in rows],
        "otlp_sink": spans,
        "targets": result_targets,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with signals_raise():
        try:
            result = run(args)
        except KeyboardInterrupt:
            print("interrupted; every child stopped", file=sys.stderr)
            return 130
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
