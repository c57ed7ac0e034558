"""What the living demo costs: CPU of ``meshctl demo``'s whole process tree, by part.

    .venv/bin/python bench/demo.py [--warmup S] [--seconds S] [--rps R] [--json out.json]

Starts ``meshctl demo`` as ``make run`` does (default load, its own free port and temporary data
folder), waits until every agent is SYNCED, lets it warm up, then reads the CPU time of every
process under it from /proc at the start and the end of ``--seconds`` and prints it as % of one
core, split by part:

- control plane: ``meshctl serve`` and its worker processes;
- agents: the ``mesh-agent`` of every demo instance;
- demo apps: the demo services' processes;
- load generator: its process and its own agent;
- runner: ``meshctl demo`` itself (it starts, watches and stops the others).

The peer, measured in the same run right after: nginx (one worker, ``return 200``) answering as
many requests per second as the demo's agents proxy in all (the sum of the topology's edge rates
over the measured window), from one keep-alive client thread of this script. It is the floor for
that request rate in C, with no routing, telemetry or application work; its client's CPU is
shown on its own row. The issue's target: the whole demo well under one core (100 %).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from app.demo.topology import SERVICES

ROOT = Path(__file__).resolve().parents[1]
MESHCTL = [sys.executable, "-c", "from app.cli import main; main()"]
TICKS = os.sysconf("SC_CLK_TCK")
PARTS = ("control plane", "agents", "demo apps", "load generator", "runner")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        document: dict[str, Any] = json.loads(answer.read())
        return document


def process_table() -> dict[int, tuple[int, float, list[str]]]:
    """pid → (parent pid, CPU seconds so far, argv) of every process we can read."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
        table[int(entry)] = (int(fields[1]), cpu, [a.decode(errors="replace") for a in argv])
    return table


def tree(root: int, table: dict[int, tuple[int, float, list[str]]]) -> set[int]:
    found = {root}
    grew = True
    while grew:
        grew = False
        for pid, (parent, _, _) in table.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def part_of(pid: int, root: int, table: dict[int, tuple[int, float, list[str]]]) -> str:
    if pid == root:
        return "runner"
    argv = table[pid][2]
    if "mesh_agent" in argv:
        return "load generator" if "loadgen" in argv else "agents"
    if "app.demo.apps" in argv:
        return "load generator" if any(a.startswith("loadgen:") for a in argv) else "demo apps"
    return "control plane"  # meshctl serve and the workers it starts


def cpu_by_part(root: int, seconds: float) -> tuple[dict[str, float], dict[str, int]]:
    """% of one core per part over ``seconds``, and processes per part."""
    before = process_table()
    members = tree(root, before)
    started = time.monotonic()
    time.sleep(seconds)
    after = process_table()
    wall = time.monotonic() - started
    used = dict.fromkeys(PARTS, 0.0)
    count = dict.fromkeys(PARTS, 0)
    for pid in members:
        if pid not in after or after[pid][2] != before[pid][2]:
            continue  # exited (or its pid reused) while we measured
        part = part_of(pid, root, before)
        used[part] += after[pid][1] - before[pid][1]
        count[part] += 1
    return {p: 100 * used[p] / wall for p in PARTS}, count


def proxied_rps(url: str) -> float:
    """Requests per second all the demo's edges carried over the last minute."""
    graph = get_json(url + "/api/v1/topology?window=1m&namespace=shop")
    return float(sum(e["metrics"]["rps"] for e in graph["edges"]))


def nginx_peer(rps: float, seconds: float, tmp: Path) -> tuple[float, float]:
    """CPU % of one core of nginx answering ``rps`` requests/s, and of its client thread."""
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err;\n"
        "events { worker_connections 64; }\n"
        f"http {{ access_log off; client_body_temp_path {tmp}; proxy_temp_path {tmp};\n"
        f"  fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n"
        f'  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok"; }} }} }}\n'
    )
    nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        stop = threading.Event()
        client_cpu: list[float] = []

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            started = time.thread_time()
            due = time.monotonic()
            while not stop.is_set():
                conn.request("GET", "/")
                conn.getresponse().read()
                due += 1 / rps
                time.sleep(max(0.0, due - time.monotonic()))
            client_cpu.append(time.thread_time() - started)
            conn.close()

        thread = threading.Thread(target=client)
        thread.start()
        time.sleep(2)  # connections and nginx warm
        workers = tree(nginx.pid, process_table())
        before = process_table()
        started = time.monotonic()
        time.sleep(seconds)
        after = process_table()
        wall = time.monotonic() - started
        stop.set()
        thread.join()
        used = sum(after[p][1] - before[p][1] for p in workers if p in after and p in before)
        return 100 * used / wall, 100 * client_cpu[0] / (wall + 2)
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds after SYNCED")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--rps", type=float, default=None, help="demo load (default: the demo's)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    agents = sum(len(s.versions) * s.replicas for s in SERVICES) + 1  # + the load generator's
    tmp = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MESH_DATA_DIR": str(tmp / "data"), "MESH_PORT": str(port)}
    cmd = [*MESHCTL, "demo", *(["--rps", str(args.rps)] if args.rps else [])]
    log = (tmp / "demo.out").open("wb")
    demo = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            if demo.poll() is not None:
                sys.exit(f"demo exited with {demo.returncode}: see {tmp / 'demo.out'}")
            try:
                if get_json(url + "/api/v1/agents")["counts"].get("SYNCED") == agents:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit("demo agents not SYNCED within 180 s")
            time.sleep(0.5)
        print(f"demo up ({agents} agents SYNCED); warming up {args.warmup:g} s", file=sys.stderr)
        time.sleep(args.warmup)
        print(f"measuring the demo for {args.seconds:g} s", file=sys.stderr)
        load_before = os.getloadavg()[0]
        parts, processes = cpu_by_part(demo.pid, args.seconds)
        rps = proxied_rps(url)
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
        log.close()
    print(f"measuring nginx at {rps:.1f} requests/s for {args.seconds:g} s", file=sys.stderr)
    nginx_cpu, client_cpu = nginx_peer(rps, args.seconds, tmp) if shutil.which("nginx") else (0, 0)
    shutil.rmtree(tmp, ignore_errors=True)

    total = sum(parts.values())
    rows = [(p, processes[p], parts[p]) for p in PARTS]
    print(f"\nmeshctl demo, {agents} agents, {rps:.1f} proxied requests/s (sum of edges), "
          f"load average {load_before:.2f} on {os.cpu_count()} cores")  # fmt: skip
    print(f"{'part':<34}{'procs':>6}{'CPU % of 1 core':>17}{'share':>8}")
    for name, n, pct in rows:
        print(f"{name:<34}{n:>6}{pct:>17.1f}{pct / total if total else 0:>8.0%}")
    print(f"{'demo total':<34}{sum(processes.values()):>6}{total:>17.1f}{1:>8.0%}")
    print(f"{'peer: nginx, same requests/s':<34}{1:>6}{nginx_cpu:>17.1f}")
    print(f"{'  (its client thread)':<34}{'':>6}{client_cpu:>17.1f}")
    print(f"\ndemo / one core: {total / 100:.2f}  (target: well under 1)")
    if nginx_cpu > 0:
        print(f"demo / nginx at the same request rate: {total / nginx_cpu:.0f}x")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"parts": parts, "processes": processes, "total": total, "rps": rps,
                 "nginx": nginx_cpu, "nginx_client": client_cpu},
                indent=2,
            )
        )  # fmt: skip


if __name__ == "__main__":
    main()
