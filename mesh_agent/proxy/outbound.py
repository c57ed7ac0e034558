"""The outbound side: the local app's requests to other services, routed by the config in
force, with retries (idempotent methods, buffered bodies, within the route timeout and the retry
budget, preferring another endpoint), fault injection and mirroring."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from mesh_agent.balancer import Endpoint
from mesh_agent.proxy.contracts import ConfigHolder, TelemetryLike
from mesh_agent.proxy.downstream import Downstream
from mesh_agent.proxy.errors import FAILURE_REASON, Failure
from mesh_agent.proxy.exchange import Forwarder
from mesh_agent.proxy.http1 import Request, new_request_id, split_target
from mesh_agent.proxy.mirror import Mirror
from mesh_agent.resilience import RetryRules, percent_chance
from mesh_agent.routing import CompiledRoute, CompiledService, VersionPool

__all__ = ["OutboundSide"]


class OutboundSide:
    """The local app → this agent → a destination service's endpoints."""

    def __init__(
        self,
        forwarder: Forwarder,
        holder: ConfigHolder,
        telemetry: TelemetryLike,
        service: str,
        mirror: Mirror,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.forwarder = forwarder
        self.loop = forwarder.loop
        self.holder = holder
        self.telemetry = telemetry
        self.service = service
        self.mirror = mirror
        self.rng = rng

    async def handle(self, conn: Downstream, req: Request) -> bool:
        cfg = self.holder.current
        tel = self.telemetry
        loop = self.loop
        authority, path = split_target(req.url, req.host)
        if authority is None or not path:
            reason = "unsupported" if req.url[:8].lower() == b"https://" else "malformed-request"
            return conn.send_error(req, 501 if reason == "unsupported" else 400, reason)
        svc = cfg.service_for(authority)
        if svc is None:
            self.forwarder.record(req, self.service, "unknown", "unknown", 404)
            return conn.send_error(req, 404, "unknown-service")
        if svc.rate_limit is not None and not svc.rate_limit.try_acquire():
            self.forwarder.record(req, self.service, svc.name, "unknown", 429)
            return conn.send_error(req, 429, "rate-limited")
        q = path.find(b"?")
        route = svc.match(
            req.method, path if q < 0 else path[:q], req.lookup() if svc.needs_headers else None
        )
        if route is None:
            self.forwarder.record(req, self.service, svc.name, "unknown", 404)
            return conn.send_error(req, 404, "no-route")
        pool = route.pick_pool()
        if route.fault is not None:
            delay = route.fault.delay()
            if delay > 0:
                await asyncio.sleep(delay)
            abort = route.fault.abort()
            if abort is not None:
                self.forwarder.record(req, self.service, svc.name, pool.version, abort)
                return conn.send_error(req, abort, "fault-abort")
        body = await self.forwarder.read_body(req)
        span = tel.start_span(
            name=f"{svc.name} outbound",
            kind="client",
            traceparent=req.traceparent,
            attributes={
                "http.request.method": req.method.decode("latin-1"),
                "mesh.destination": svc.name,
                "mesh.route": route.name,
            },
        )
        tp = span.traceparent() if span is not None else tel.outgoing_traceparent(req.traceparent)
        request_id = req.request_id or new_request_id()
        fwd = self.forwarder
        head = fwd.finish_head(
            fwd.build_head(req, path, authority, body, tp, request_id, outbound=True), conn, req
        )
        if (
            body is not None
            and route.mirror is not None
            and percent_chance(route.mirror_percent, self.rng)
        ):
            self.mirror.maybe_send(route, svc, req, path, authority, body, tp, request_id, conn)
        status: int | None = None
        try:
            status, keep = await self.forward(conn, req, svc, route, pool, head, body)
            return keep
        finally:
            if span is not None:
                span.end(status)
            tel.record(
                source=self.service,
                destination=svc.name,
                destination_version=pool.version,
                status=status,
                duration_s=loop.time() - req.started,
            )

    async def forward(
        self,
        conn: Downstream,
        req: Request,
        svc: CompiledService,
        route: CompiledRoute,
        pool: VersionPool,
        head: bytes,
        body: bytes | None,
    ) -> tuple[int | None, bool]:
        loop = self.loop
        rules = route.retry
        # The route timeout covers the upstream side (all tries), not the client's upload.
        route_deadline = loop.time() + route.timeout_s
        svc.budget.record_request()
        retryable = body is not None and rules.attempts > 0 and rules.method_allowed(req.method)
        attempt = 0
        avoid: Endpoint | None = None
        while True:
            now = loop.time()
            ep = pool.balancer.pick(now, avoid)
            deadline = route_deadline
            if rules.per_try_timeout_s is not None:
                deadline = min(deadline, now + rules.per_try_timeout_s)
            ep.active_requests += 1
            try:
                try:
                    up = await self.forwarder.exchange(
                        ep,
                        req,
                        head,
                        body,
                        deadline,
                        svc.max_connections,
                        svc.max_pending,
                        svc.connect_timeout_s,
                        body_deadline=route_deadline,
                    )
                except Failure as f:
                    if f.kind != "overflow":
                        svc.outlier.report(ep, True, pool.endpoints)
                    if (
                        retryable
                        and f.kind != "overflow"
                        and attempt < rules.attempts
                        and rules.failure_retryable(f.kind)
                        and await self.backoff(rules, attempt + 1, route_deadline, svc)
                    ):
                        attempt += 1
                        avoid = ep
                        continue
                    status = 504 if f.kind == "timeout" else 503
                    return status, conn.send_error(req, status, FAILURE_REASON[f.kind])
                status = up.status
                failed = status >= 500
                svc.outlier.report(ep, failed, pool.endpoints)
                if (
                    failed
                    and retryable
                    and attempt < rules.attempts
                    and rules.status_retryable(status)
                    and await self.backoff(rules, attempt + 1, route_deadline, svc)
                ):
                    self.forwarder.release(up)  # a retried 5xx: keep the connection if clean
                    attempt += 1
                    avoid = ep
                    continue
                try:
                    keep = await self.forwarder.relay(conn, req, up)
                finally:
                    self.forwarder.release(up)
                if up.failure == "timeout":
                    return None, keep  # cut off mid-body: no complete response
                return status, keep
            finally:
                ep.active_requests -= 1

    async def backoff(
        self, rules: RetryRules, retry_number: int, deadline: float, svc: CompiledService
    ) -> bool:
        """Wait before a retry; False when the deadline or the retry budget forbids it."""
        delay = rules.backoff(retry_number, self.rng)
        if self.loop.time() + delay >= deadline:
            return False
        if not svc.budget.try_retry():
            return False
        if delay > 0:
            await asyncio.sleep(delay)
        return True
