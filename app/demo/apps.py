"""The demo's services: small HTTP apps that answer after a while, sometimes fail, and call the
services they depend on through their own agent's outbound listener (``Host: <service>``),
passing ``traceparent`` on so the agents' spans join into one trace.

One process can run several instances (the local demo runs them all in one, to stay light);
a container runs one. ``python -m app.demo.apps --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from app.demo.topology import LOADGEN, SERVICES, Behaviour, DemoService

__all__ = ["Instance", "main", "parse_instance"]

log = logging.getLogger("mesh.demo.apps")

_BY_NAME = {s.name: s for s in (*SERVICES, LOADGEN)}
MAX_HEAD = 16 * 1024


@dataclass(frozen=True)
class Instance:
    service: DemoService
    version: str
    listen_port: int
    outbound_port: int

    @property
    def behaviour(self) -> Behaviour:
        return self.service.versions[self.version]


def parse_instance(text: str) -> Instance:
    """``SERVICE:VERSION:LISTEN_PORT:OUTBOUND_PORT`` (LISTEN_PORT 0 for the load generator)."""
    try:
        name, version, listen, outbound = text.split(":")
        service = _BY_NAME[name]
        if version not in service.versions:
            raise KeyError(version)
        return Instance(service, version, int(listen), int(outbound))
    except (ValueError, KeyError) as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SERVICE:VERSION:LISTEN_PORT:OUTBOUND_PORT ({exc})"
        ) from None


def _delay_s(behaviour: Behaviour) -> float:
    # Log-normal around the median: most requests near it, a tail of slow ones, like real apps.
    return behaviour.latency_ms * math.exp(random.gauss(0, 0.35)) / 1000


class App:
    def __init__(self, instance: Instance, host: str) -> None:
        self.instance = instance
        self.host = host
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{instance.outbound_port}", timeout=10.0
        )
        self.count = 0

    async def start(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self.serve, self.host, self.instance.listen_port)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                if len(head) > MAX_HEAD:
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = [*lines[0].split(" "), "", "", ""][:3]
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(min(length, 1 << 20))
                status, body = await self.handle(method, path, headers)
                writer.write(
                    f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}\r\n"
                    "content-type: application/json\r\n"
                    f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (ConnectionError, ValueError):
            return
        finally:
            writer.close()

    async def handle(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        self.count += 1
        behaviour = self.instance.behaviour
        await asyncio.sleep(_delay_s(behaviour))
        forward: dict[str, str] = {
            k: headers[k] for k in ("traceparent", "tracestate") if k in headers
        }
        calls: dict[str, int] = {}
        status = 200
        for call in self.instance.service.calls:
            if self.count % call.every:
                continue
            code = await self.call(call.service, call.path, forward)
            calls[call.service] = code
            if code >= 500:
                status = 502  # a failed dependency fails this request too
        if random.random() < behaviour.error_rate:
            status = 500
        body = {
            "service": self.instance.service.name,
            "version": self.instance.version,
            "path": path,
            "calls": calls,
        }
        return status, json.dumps(body).encode()

    async def call(self, service: str, path: str, headers: dict[str, str]) -> int:
        try:
            answer = await self.client.get(path, headers={"host": service, **headers})
        except httpx.HTTPError:
            return 599
        return answer.status_code


async def loadgen(outbound_port: int, rps: float, stop: asyncio.Event) -> None:
    """Steady, gentle traffic to the frontend through the load generator's agent."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{outbound_port}", timeout=10.0
    ) as client:
        in_flight: set[asyncio.Task[None]] = set()

        async def one() -> None:
            with contextlib.suppress(httpx.HTTPError):
                await client.get("/", headers={"host": "frontend"})

        while not stop.is_set():
            if len(in_flight) < 64:  # never pile up if the mesh is down
                task = asyncio.create_task(one())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            try:
                async with asyncio.timeout(random.expovariate(rps)):
                    await stop.wait()
            except TimeoutError:
                pass
        for task in in_flight:
            task.cancel()


async def run(instances: Sequence[Instance], host: str, rps: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = []
    tasks = []
    for instance in instances:
        if instance.service is LOADGEN:
            tasks.append(asyncio.create_task(loadgen(instance.outbound_port, rps, stop)))
        else:
            servers.append(await App(instance, host).start())
    log.info("demo apps up: %s", ", ".join(f"{i.service.name}/{i.version}" for i in instances))
    await stop.wait()
    for server in servers:
        server.close()
    for task in tasks:
        await task


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m app.demo.apps", description="Run demo service instances."
    )
    parser.add_argument(
        "--instance",
        type=parse_instance,
        action="append",
        required=True,
        help="SERVICE:VERSION:LISTEN_PORT:OUTBOUND_PORT, repeatable; 'loadgen:v1:0:PORT' "
        "sends the demo traffic",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the apps listen on")
    parser.add_argument("--rps", type=float, default=8.0, help="load generator requests/second")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    asyncio.run(run(args.instance, args.host, args.rps))


if __name__ == "__main__":
    main()
