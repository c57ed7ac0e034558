"""Instructions per proxied request, counted by callgrind: mesh-agent beside nginx, repeatable.

    .venv/bin/python bench/proxy_instructions.py [--requests N] [--rows agent,outbound,nginx]

Wall-clock benchmarks (``bench/proxy.py``) on a shared two-core machine swing by 10 % and more
between runs, which hides the change a single commit makes. Callgrind counts the instructions a
process executes instead: the same binary, inputs and request count give the same number,
whatever else the machine is doing. So this script is for A/B comparisons (run it on two trees,
e.g. ``PYTHONPATH=/tmp/other-tree``, and compare) and for locating the cost (``--keep`` leaves
the callgrind files for ``callgrind_annotate``).

Rows, each ending at the same nginx ``return 200 "ok"`` backend, with one proxy counted:

- agent     client → mesh-agent inbound listener → backend   (the agent under callgrind)
- outbound  client → mesh-agent outbound listener → backend  (Host: backend; the agent counted)
- nginx     client → nginx (proxy_pass, upstream keepalive) → backend   (nginx counted)

What this does not count: the kernel. Each proxied request costs two reads and two writes on
any of these proxies, and the system time they take is about half of a request's CPU (see
docs/agent.md, "Speed"); instructions in user space are the part a change to the agent moves.
The client keeps ``--connections`` keep-alive connections busy, one request in flight on each.
Needs valgrind (``callgrind_control`` comes with it) and nginx.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proxy import (
    BACKEND,
    DEST_SERVICE,
    NGINX_COMMON,
    NGINX_PROXY,
    Children,
    agent_config,
    free_port,
    start_nginx,
    wait_ok,
)

ALL_ROWS = ("agent", "outbound", "nginx")
MAX_HEAD_BYTES = 64 * 1024


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]


def drive(port: int, host: str, count: int, connections: int) -> None:
    """Send ``count`` GET requests over ``connections`` keep-alive connections, one in flight
    on each, reading every response to its end (the backend answers with a Content-Length)."""
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    buffers: dict[socket.socket, bytes] = {}
    sent = done = 0
    socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(connections)]
    try:
        for s in socks:
            if sent < count:
                s.sendall(request)
                sent += 1
            buffers[s] = b""
            selector.register(s, selectors.EVENT_READ)
        while done < count:
            events = selector.select(120)
            if not events:
                raise RuntimeError(f"no response in 120 s after {done} of {count} requests")
            for key, _ in events:
                s = key.fileobj
                assert isinstance(s, socket.socket)
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("the proxy closed a keep-alive connection")
                data = buffers[s] + chunk
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if len(data) > MAX_HEAD_BYTES:
                        raise RuntimeError("response head too large")
                    buffers[s] = data
                    continue
                found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", data[:end])
                if not data.startswith(b"HTTP/1.1 200") or found is None:
                    raise RuntimeError(f"unexpected response: {data[:200]!r}")
                total = end + 4 + int(found.group(1))
                if len(data) < total:
                    buffers[s] = data
                    continue
                buffers[s] = data[total:]
                done += 1
                if sent < count:
                    s.sendall(request)
                    sent += 1
    finally:
        selector.close()
        for s in socks:
            s.close()


def instructions(dump_prefix: Path, before: set[Path]) -> int:
    """The instruction total of the newest dump written since ``before`` was listed."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(dump_prefix.parent.glob(dump_prefix.name + ".*")) - before
        for path in sorted(new, key=lambda p: p.stat().st_mtime, reverse=True):
            text = path.read_text(errors="replace")
            found = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
            if found:
                return int(found.group(1))
        time.sleep(0.5)
    raise RuntimeError(f"callgrind wrote no dump next to {dump_prefix}")


def count_row(pid: int, port: int, host: str, out: Path, args: argparse.Namespace) -> float:
    """Instructions per request of process ``pid``: warm up, zero its counters, send
    ``args.requests`` requests, dump."""
    drive(port, host, args.warmup, args.connections)
    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
    before = set(out.parent.glob(out.name + ".*"))
    drive(port, host, args.requests, args.connections)
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    return instructions(out, before) / args.requests


def run_row(row: str, tmp: Path, args: argparse.Namespace, log: list[str]) -> float:
    children = Children()
    try:
        backend = free_port()
        start_nginx(children, tmp, f"backend-{row}", BACKEND.format(port=backend))
        port = free_port()
        out = tmp / f"{row}.callgrind"
        if row == "nginx":
            conf = tmp / "counted-nginx.conf"
            body = NGINX_PROXY.format(port=port, backend=backend)
            conf.write_text(NGINX_COMMON.format(tmp=tmp, name="counted-nginx", body=body))
            # One process, no master: the process counted is the one that proxies.
            flags = "daemon off; master_process off;"
            argv = ["nginx", "-p", str(tmp), "-c", str(conf), "-g", flags]
            proc = children.start(row, callgrind(out) + argv, tmp, cwd=tmp)
            host = DEST_SERVICE
        else:
            config = tmp / f"{row}.yaml"
            agent_config(config, {DEST_SERVICE: [backend]})
            inbound, outbound, admin = free_port(), free_port(), free_port()
            argv = [
                sys.executable, "-m", "mesh_agent", "--service", DEST_SERVICE,
                "--inbound", f"127.0.0.1:{inbound}", "--app", f"127.0.0.1:{backend}",
                "--outbound", f"127.0.0.1:{outbound}", "--admin", f"127.0.0.1:{admin}",
                "--config", str(config), "--state-dir", str(tmp / f"{row}-state"),
            ]  # fmt: skip
            env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
            proc = children.start(row, callgrind(out) + argv, tmp, env=env)
            port = inbound if row == "agent" else outbound
            host = f"127.0.0.1:{port}" if row == "agent" else DEST_SERVICE
        wait_ok(port, children, row, timeout=args.start_timeout)
        per_request = count_row(proc.pid, port, host, out, args)
        log.append(f"{row}: {per_request:,.0f} instructions per request")
        return per_request
    finally:
        children.stop_all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default=",".join(ALL_ROWS), help=f"subset of {','.join(ALL_ROWS)}")
    p.add_argument("--requests", type=int, default=3000, help="requests counted per row (3000)")
    p.add_argument("--warmup", type=int, default=1000, help="requests before counting (1000)")
    p.add_argument("--connections", type=int, default=8, help="keep-alive connections (8)")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds to come up (180)")
    p.add_argument("--keep", action="store_true", help="keep the callgrind files and logs")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ALL_ROWS)
    if unknown:
        p.error(f"unknown rows: {', '.join(sorted(unknown))}")
    tools = ("valgrind", "callgrind_control", "nginx")
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        print(f"needs {', '.join(missing)} on PATH", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    log: list[str] = []
    results: dict[str, float] = {}
    try:
        for row in rows:
            results[row] = run_row(row, tmp, args, log)
            print(log[-1], file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"callgrind files and logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    peer = results.get("nginx")
    print(f"\n{'row':10} {'instructions/request':>21} {'vs nginx':>9}")
    for row, value in results.items():
        ratio = f"{value / peer:8.2f}x" if peer else "        -"
        print(f"{row:10} {value:21,.0f} {ratio}")
    print(
        f"\n{args.requests} requests per row after {args.warmup} to warm up, "
        f"{args.connections} connections; user-space instructions only (callgrind)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
