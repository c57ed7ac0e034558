"""The outbound side: the local app's requests to other services, routed by the config in
force, with retries (idempotent methods, buffered bodies, within the route timeout and the retry
budget, preferring another endpoint), fault injection and mirroring."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from mesh_agent.balancer import Endpoint
from mesh_agent.proxy.contracts import ConfigHolder, SpanLike, TelemetryLike
from mesh_agent.proxy.downstream import Downstream
from mesh_agent.proxy.errors import FAILURE_REASON, Failure
from mesh_agent.proxy.exchange import FastRelay, Forwarder, idle_connections, send_fast
from mesh_agent.proxy.http1 import Request, split_target
from mesh_agent.proxy.mirror import Mirror
from mesh_agent.proxy.upstream import Upstream
from mesh_agent.resilience import RetryRules, percent_chance
from mesh_agent.routing import CompiledRoute, CompiledService, VersionPool

__all__ = ["FastExchange", "OutboundSide", "Plan"]

# Routing decided for one request: service, route, version pool, endpoint for the first try.
Plan = tuple[CompiledService, CompiledRoute, VersionPool, Endpoint]


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
        self.fast_requests = 0  # see InboundSide.fast_requests

    async def handle(self, conn: Downstream, req: Request) -> bool:
        cfg = self.holder.current
        tel = self.telemetry
        loop = self.loop
        authority, path = split_target(req.url, req.host)
        if authority is None or not path:
            reason = "unsupported" if req.url[:8].lower() == b"https://" else "malformed-request"
            return conn.send_error(req, 501 if reason == "unsupported" else 400, reason)
        plan: Plan | None = req.plan
        first_ep: Endpoint | None = None
        if plan is not None:
            # Routed by the fast path already (which checked the rate limit and faults away).
            req.plan = None
            svc, route, pool, first_ep = plan
        else:
            found = cfg.service_for(authority)
            if found is None:
                self.forwarder.record(req, self.service, "unknown", "unknown", 404)
                return conn.send_error(req, 404, "unknown-service")
            svc = found
            if svc.rate_limit is not None and not svc.rate_limit.try_acquire():
                self.forwarder.record(req, self.service, svc.name, "unknown", 429)
                return conn.send_error(req, 429, "rate-limited")
            q = path.find(b"?")
            matched = svc.match(
                req.method,
                path if q < 0 else path[:q],
                req.lookup() if svc.needs_headers else None,
            )
            if matched is None:
                self.forwarder.record(req, self.service, svc.name, "unknown", 404)
                return conn.send_error(req, 404, "no-route")
            route = matched
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
        span, tp, head = self.begin_hop(conn, req, path, authority, body, svc, route)
        if (
            body is not None
            and route.mirror is not None
            and percent_chance(route.mirror_percent, self.rng)
        ):
            assert req.request_id is not None  # given by begin_hop
            self.mirror.maybe_send(route, svc, req, path, authority, body, tp, req.request_id, conn)
        status: int | None = None
        try:
            status, keep = await self.forward(
                conn, req, svc, route, pool, head, body, first_ep=first_ep
            )
            return keep
        finally:
            if span is not None:
                span.end(status)
            tel.record(self.service, svc.name, pool.version, status, loop.time() - req.started)

    async def forward(
        self,
        conn: Downstream,
        req: Request,
        svc: CompiledService,
        route: CompiledRoute,
        pool: VersionPool,
        head: bytes,
        body: bytes | None,
        *,
        first_ep: Endpoint | None = None,
        attempt: int = 0,
        avoid: Endpoint | None = None,
        route_deadline: float | None = None,
    ) -> tuple[int | None, bool]:
        """Send the request, with retries, and relay the chosen response. ``first_ep``: the
        endpoint already picked for the first try. A request the fast path began comes with
        its ``route_deadline`` and the ``attempt`` and endpoint to ``avoid`` it got to."""
        loop = self.loop
        rules = route.retry
        if route_deadline is None:
            # The route timeout covers the upstream side (all tries), not the client's upload.
            route_deadline = loop.time() + route.timeout_s
            svc.budget.record_request()
        retryable = body is not None and rules.attempts > 0 and rules.method_allowed(req.method)
        while True:
            now = loop.time()
            if first_ep is not None:
                ep, first_ep = first_ep, None
            else:
                ep = pool.balancer.pick(now, avoid)
            deadline = route_deadline
            if rules.per_try_timeout_s is not None:
                deadline = min(deadline, now + rules.per_try_timeout_s)
            ep.active_requests += 1
            try:
                outcome = await self.try_once(
                    conn,
                    req,
                    svc,
                    pool,
                    ep,
                    head,
                    body,
                    deadline,
                    route_deadline,
                    retryable=retryable and attempt < rules.attempts,
                    next_retry=attempt + 1,
                    rules=rules,
                )
            finally:
                ep.active_requests -= 1
            if outcome is not None:
                return outcome
            attempt += 1
            avoid = ep

    async def try_once(
        self,
        conn: Downstream,
        req: Request,
        svc: CompiledService,
        pool: VersionPool,
        ep: Endpoint,
        head: bytes,
        body: bytes | None,
        deadline: float,
        route_deadline: float,
        *,
        retryable: bool,
        next_retry: int,
        rules: RetryRules,
    ) -> tuple[int | None, bool] | None:
        """One try on ``ep``: (status, keep-alive) once the caller has its answer, or None when
        the try failed in a way the retry policy (``retryable``: attempts left) takes again.
        (A method of its own, not a ``continue`` inside try/finally: mypyc compiles this.)"""
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
                and rules.failure_retryable(f.kind)
                and await self.backoff(rules, next_retry, route_deadline, svc)
            ):
                return None
            status = 504 if f.kind == "timeout" else 503
            return status, conn.send_error(req, status, FAILURE_REASON[f.kind])
        status = up.status
        failed = status >= 500
        svc.outlier.report(ep, failed, pool.endpoints)
        if (
            failed
            and retryable
            and rules.status_retryable(status)
            and await self.backoff(rules, next_retry, route_deadline, svc)
        ):
            self.forwarder.release(up)  # a retried 5xx: keep the connection if clean
            return None
        try:
            keep = await self.forwarder.relay(conn, req, up)
        finally:
            self.forwarder.release(up)
        if up.failure == "timeout":
            return None, keep  # cut off mid-body: no complete response
        return status, keep

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

    def retry_delay(
        self, rules: RetryRules, retry_number: int, deadline: float, svc: CompiledService
    ) -> float | None:
        """:meth:`backoff` decided without waiting (for callbacks): the delay before the retry,
        or None when the deadline or the retry budget forbids it."""
        delay = rules.backoff(retry_number, self.rng)
        if self.loop.time() + delay >= deadline or not svc.budget.try_retry():
            return None
        return delay

    # -- the fast path

    def fast(self, conn: Downstream, req: Request) -> bool:
        """Send a bodiless request on an idle pooled connection without a coroutine:
        :class:`FastExchange` relays the answer from the upstream's parser callbacks and hands
        over to :meth:`resume` for a retry. False leaves the request to :meth:`handle` (with the
        routing decided here, when only the idle connection was missing)."""
        authority, path = split_target(req.url, req.host)
        if authority is None or not path:
            return False
        svc = self.holder.current.service_for(authority)
        if svc is None or svc.rate_limit is not None:
            return False
        q = path.find(b"?")
        route = svc.match(
            req.method, path if q < 0 else path[:q], req.lookup() if svc.needs_headers else None
        )
        if route is None or route.fault is not None or route.mirror is not None:
            return False
        pool = route.pick_pool()
        now = self.loop.time()
        ep = pool.balancer.pick(now)
        idle = idle_connections(ep)
        if idle is None:
            req.plan = (svc, route, pool, ep)
            return False
        span, _, head = self.begin_hop(conn, req, path, authority, b"", svc, route)
        svc.budget.record_request()
        route_deadline = now + route.timeout_s
        per_try = route.retry.per_try_timeout_s
        deadline = route_deadline if per_try is None else min(route_deadline, now + per_try)
        up = idle.pop()  # only now: nothing above may leave a connection out of the pool
        ep.active_requests += 1
        fx = FastExchange(
            self, conn, req, up, svc, route, pool, ep, head, span, deadline, route_deadline
        )
        send_fast(up, req, fx, head, route_deadline)
        self.fast_requests += 1
        return True

    def begin_hop(
        self,
        conn: Downstream,
        req: Request,
        path: bytes,
        authority: bytes,
        body: bytes | None,
        svc: CompiledService,
        route: CompiledRoute,
    ) -> tuple[SpanLike | None, bytes | None, bytes]:
        hop = self.forwarder.begin_hop(conn, req, path, authority, body, "client", True)
        span = hop[0]
        if span is not None:
            span.describe(
                f"{svc.name} outbound",
                {
                    "http.request.method": req.method.decode("latin-1"),
                    "mesh.destination": svc.name,
                    "mesh.route": route.name,
                },
            )
        return hop

    async def resume(
        self,
        conn: Downstream,
        req: Request,
        svc: CompiledService,
        route: CompiledRoute,
        pool: VersionPool,
        head: bytes,
        span: SpanLike | None,
        *,
        attempt: int,
        avoid: Endpoint | None,
        route_deadline: float,
        delay: float,
    ) -> bool:
        """Go on with a request the fast path began, as :meth:`forward` would have."""
        if delay > 0:
            await asyncio.sleep(delay)
        status: int | None = None
        try:
            status, keep = await self.forward(
                conn,
                req,
                svc,
                route,
                pool,
                head,
                b"",
                attempt=attempt,
                avoid=avoid,
                route_deadline=route_deadline,
            )
            return keep
        finally:
            if span is not None:
                span.end(status)
            self.telemetry.record(
                self.service, svc.name, pool.version, status, self.loop.time() - req.started
            )


class FastExchange(FastRelay):
    """One outbound request relayed from callbacks (see :class:`FastRelay`); a response or
    failure that the retry policy retries hands the request over to
    :meth:`OutboundSide.resume` (the retry itself runs in a coroutine)."""

    __slots__ = ("pool", "route", "route_deadline", "side", "svc")

    def __init__(
        self,
        side: OutboundSide,
        conn: Downstream,
        req: Request,
        up: Upstream,
        svc: CompiledService,
        route: CompiledRoute,
        pool: VersionPool,
        ep: Endpoint,
        head_bytes: bytes,
        span: SpanLike | None,
        deadline: float,
        route_deadline: float,
    ) -> None:
        super().__init__(side.forwarder, conn, req, up, ep, head_bytes, span, deadline)
        self.side = side
        self.svc = svc
        self.route = route
        self.pool = pool
        self.route_deadline = route_deadline

    def _retry_delay(self) -> float | None:
        rules = self.route.retry
        if rules.attempts == 0 or not rules.method_allowed(self.req.method):
            return None
        return self.side.retry_delay(rules, 1, self.route_deadline, self.svc)

    def _hand_over(self, *, attempt: int, avoid: Endpoint | None, delay: float) -> None:
        self.ep.active_requests -= 1
        side = self.side
        self.conn.run_fast_fallback(
            self.req,
            side.resume(
                self.conn,
                self.req,
                self.svc,
                self.route,
                self.pool,
                self.head_bytes,
                self.span,
                attempt=attempt,
                avoid=avoid,
                route_deadline=self.route_deadline,
                delay=delay,
            ),
        )

    def head(self) -> None:
        """The response head arrived (called from the upstream parser): retried if the retry
        policy says so, else relayed."""
        try:
            up = self.up
            status = up.status
            failed = status >= 500
            self.svc.outlier.report(self.ep, failed, self.pool.endpoints)
            if failed and self.route.retry.status_retryable(status):
                delay = self._retry_delay()
                if delay is not None:
                    # Not relayed: the connection is dropped rather than read to the end.
                    up.fast = None
                    up.discard = True
                    up.abort()
                    self._hand_over(attempt=1, avoid=self.ep, delay=delay)
                    return
            self.relay_head()
        except Exception:
            self.internal_error()

    def fail(self, kind: str) -> None:
        """No complete response: retried as :meth:`OutboundSide.forward` would, else an error
        (before the head) or a truncated response (after it)."""
        try:
            up = self.up
            conn = self.conn
            up.abort()
            if self.headed:
                self.break_off(kind)
                return
            if kind == "reset" and not up.got_bytes:
                # The pooled connection was closed as we reused it: the upstream never saw the
                # request, so it is sent again, neither a retry nor the endpoint's fault.
                self._hand_over(attempt=0, avoid=None, delay=0.0)
                return
            self.svc.outlier.report(self.ep, True, self.pool.endpoints)
            if self.route.retry.failure_retryable(kind):
                delay = self._retry_delay()
                if delay is not None:
                    self._hand_over(attempt=1, avoid=self.ep, delay=delay)
                    return
            status = 504 if kind == "timeout" else 503
            keep = conn.send_error(self.req, status, FAILURE_REASON[kind])
        except Exception:
            self.internal_error()
            return
        self.finish(status, keep)

    def record(self, status: int | None) -> None:
        side = self.side
        side.telemetry.record(
            side.service,
            self.svc.name,
            self.pool.version,
            status,
            side.forwarder.clock() - self.req.started,
        )
