"""Prometheus metrics of the push path (served at the control plane's ``/metrics``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

if TYPE_CHECKING:
    from app.agents.hub import PushHub

__all__ = ["PushMetrics"]


class PushMetrics:
    """One set per hub (per app), on its own registry, so tests and several apps in one
    process never collide on metric names."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.snapshots = Counter(
            "mesh_push_snapshots", "Group snapshots whose content changed.", registry=self.registry
        )
        self.pushes = Counter(
            "mesh_push_responses", "Config responses sent to agents.", registry=self.registry
        )
        self.acks = Counter("mesh_push_acks", "ACKs received from agents.", registry=self.registry)
        self.nacks = Counter(
            "mesh_push_nacks", "NACKs received from agents.", registry=self.registry
        )
        self.unauthorized = Counter(
            "mesh_agent_auth_failures",
            "Agent requests refused for a missing or wrong join token.",
            registry=self.registry,
        )
        self.compile_seconds = Histogram(
            "mesh_push_compile_seconds",
            "Time to recompile after a change.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
            registry=self.registry,
        )
        self.convergence_seconds = Histogram(
            "mesh_push_convergence_seconds",
            "From a change's commit to the last targeted agent's answer.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )

    def exposition(self, hub: PushHub) -> bytes:
        """The registry's text plus the agents per sync state, counted at scrape time."""
        counts: dict[str, int] = {}
        for agent in hub.status.all():
            state = hub.sync_state(agent).value
            counts[state] = counts.get(state, 0) + 1
        lines = [
            "# HELP mesh_agents Registered agents by sync state.",
            "# TYPE mesh_agents gauge",
            *(f'mesh_agents{{state="{state}"}} {n}' for state, n in sorted(counts.items())),
        ]
        return generate_latest(self.registry) + ("\n".join(lines) + "\n").encode()
