"""Active health checks through the real agent: an endpoint failing its check takes no traffic
and gets it back once it passes again; below the panic threshold traffic goes to all."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest

from mesh_agent.config import ConfigError, validate_config

from .support import Agent, Backend, BackendRequest, Response, run, service, wait_until

pytestmark = pytest.mark.e2e

FAST_CHECK = {
    "path": "/healthz",
    "interval_ms": 20,
    "timeout_ms": 1000,
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
    "jitter_percent": 0,
}


class Checked(Backend):
    """A backend whose /healthz answers ``health_status``; other paths answer its name."""

    def __init__(self, name: str) -> None:
        super().__init__(self._answer, name)
        self.health_status = 200

    async def _answer(self, req: BackendRequest) -> Response:
        if req.path == "/healthz":
            return Response(status=self.health_status, body=b"health")
        return Response(body=self.name.encode())

    def traffic(self) -> int:
        return sum(1 for q in self.requests if q.path != "/healthz")

    def checks(self) -> list[BackendRequest]:
        return [q for q in self.requests if q.path == "/healthz"]


def _healthy(agent: Agent, backend: Backend) -> bool:
    return agent.registry.get("127.0.0.1", backend.port).healthy


def test_an_endpoint_failing_its_check_takes_no_traffic_until_it_passes_again() -> None:
    async def scenario() -> None:
        async with Checked("a") as a, Checked("b") as b:
            svc = service(
                "reviews",
                {"v1": [a.address, b.address]},
                load_balancer="round_robin",
                health_check=FAST_CHECK,
                retries={"attempts": 0},
            )
            async with (
                Agent({"services": [svc]}) as agent,
                httpx.AsyncClient(base_url=agent.outbound) as c,
            ):
                await wait_until(lambda: len(a.checks()) >= 1 and len(b.checks()) >= 1)
                a.health_status = 503
                await wait_until(lambda: not _healthy(agent, a))
                before = a.traffic()
                bodies = [(await c.get("/", headers={"host": "reviews"})).text for _ in range(20)]
                assert bodies == ["b"] * 20
                assert a.traffic() == before  # the failing endpoint got none of it
                a.health_status = 200
                await wait_until(lambda: _healthy(agent, a))
                bodies = [(await c.get("/", headers={"host": "reviews"})).text for _ in range(20)]
                assert Counter(bodies) == {"a": 10, "b": 10}
            check = a.checks()[0]
            assert check.method == "GET" and check.headers["host"] == "reviews"

    run(scenario())


def test_below_the_panic_threshold_traffic_goes_to_every_endpoint() -> None:
    async def scenario() -> None:
        async with Checked("a") as a, Checked("b") as b, Checked("c") as c3:
            svc = service(
                "reviews",
                {"v1": [a.address, b.address, c3.address]},
                load_balancer="round_robin",
                health_check=FAST_CHECK,
                retries={"attempts": 0},
            )
            async with (
                Agent({"services": [svc]}) as agent,
                httpx.AsyncClient(base_url=agent.outbound) as c,
            ):
                a.health_status = b.health_status = 503
                await wait_until(lambda: not _healthy(agent, a) and not _healthy(agent, b))
                # one of three healthy: 33 % < 50 %, so all three share the traffic
                bodies = [(await c.get("/", headers={"host": "reviews"})).text for _ in range(30)]
                assert Counter(bodies) == {"a": 10, "b": 10, "c": 10}
                # with the threshold off, only the healthy one gets traffic
                agent.apply({"services": [{**svc, "panic_threshold_percent": 0}]})
                bodies = [(await c.get("/", headers={"host": "reviews"})).text for _ in range(9)]
                assert bodies == ["c"] * 9

    run(scenario())


def test_health_state_is_on_metrics_and_an_unchecked_endpoint_is_healthy_again() -> None:
    async def scenario() -> None:
        from mesh_agent.agent import Agent as CoreAgent

        from .support import FakeTelemetry

        async with Checked("a") as a:
            agent = CoreAgent(service="web", telemetry=FakeTelemetry())
            svc = service("reviews", {"v1": [a.address]}, health_check=FAST_CHECK)
            agent.store.offer(validate_config({"services": [svc]}))
            a.health_status = 500
            listeners = await agent.start(outbound=("127.0.0.1", 0), admin=("127.0.0.1", 0))
            try:
                ep = agent.registry.get("127.0.0.1", a.port)
                await wait_until(lambda: not ep.healthy)
                async with httpx.AsyncClient() as c:
                    text = (await c.get(f"http://{listeners['admin']}/metrics")).text
                assert (
                    f'mesh_agent_endpoint_healthy{{service="reviews",endpoint="{a.address}"}} 0'
                    in text
                )
                assert 'mesh_agent_health_checks_total{result="fail"}' in text
                # the check is removed from the config: the endpoint is healthy again
                agent.store.offer(
                    validate_config({"services": [service("reviews", {"v1": [a.address]})]})
                )
                assert ep.healthy
            finally:
                await agent.close()

    run(scenario())


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ({"path": "healthz"}, "services[0].health_check.path: must start with '/'"),
        ({"interval_ms": 0}, "services[0].health_check.interval_ms: Input should be greater"),
        ({"unhealthy_threshold": 0}, "services[0].health_check.unhealthy_threshold: Input"),
        ({"jitter_percent": 150}, "services[0].health_check.jitter_percent: Input should be less"),
        ({"paht": "/x"}, "services[0].health_check.paht: Extra inputs are not permitted"),
    ],
)
def test_bad_health_checks_are_rejected_with_their_path(
    check: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(
            {"services": [service("reviews", {"v1": ["10.0.0.1:80"]}, health_check=check)]}
        )
    assert any(str(i).startswith(message) for i in info.value.issues), info.value.issues
