"""The demo application: a small shop of eight services, declared once.

The catalog seed, the processes the runner starts and the Docker Compose file all come from this
table. ``catalog`` v2 is the canary: slower and flakier than v1, so shifting traffic to it shows
in the graphs within a refresh or two, and rolling back heals them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEMO_NAMESPACE", "LOADGEN", "SERVICES", "Behaviour", "Call", "DemoService"]

DEMO_NAMESPACE = "shop"


@dataclass(frozen=True)
class Behaviour:
    latency_ms: float  # median of a log-normal spread
    error_rate: float = 0.0  # share of requests answered 500


@dataclass(frozen=True)
class Call:
    service: str
    path: str
    every: int = 1  # call on one request in ``every``


@dataclass(frozen=True)
class DemoService:
    name: str
    team: str
    description: str
    versions: dict[str, Behaviour]
    calls: tuple[Call, ...] = ()
    path: str = "/"
    # Instances of each version. More than one shows the agents' containment: kill one and
    # its callers eject it and retry on the other.
    replicas: int = 1

    @property
    def dependencies(self) -> list[str]:
        return sorted({call.service for call in self.calls})


SERVICES: tuple[DemoService, ...] = (
    DemoService(
        "frontend",
        "web",
        "Storefront pages; fans out to catalog, recommendations and checkout.",
        {"v1": Behaviour(3)},
        (
            Call("catalog", "/products"),
            Call("recommendations", "/recs"),
            Call("checkout", "/checkout", every=3),
        ),
    ),
    DemoService(
        "catalog",
        "catalog",
        "Product catalog. v2 is a canary with a new search index (slower, flakier).",
        {"v1": Behaviour(8, 0.002), "v2": Behaviour(70, 0.08)},
    ),
    DemoService(
        "recommendations",
        "discovery",
        "Products you may like; reads the catalog.",
        {"v1": Behaviour(6)},
        (Call("catalog", "/products"),),
    ),
    DemoService(
        "checkout",
        "orders",
        "Checkout API: reserves stock, takes payment, books shipping.",
        {"v1": Behaviour(4)},
        (Call("inventory", "/reserve"), Call("payments", "/charge"), Call("shipping", "/quote")),
    ),
    DemoService(
        "inventory", "orders", "Stock levels and reservations.", {"v1": Behaviour(5)}, replicas=2
    ),
    DemoService(
        "payments", "payments", "Card payments gateway adapter.", {"v1": Behaviour(25, 0.01)}
    ),
    DemoService("shipping", "orders", "Shipping quotes and labels.", {"v1": Behaviour(10)}),
    DemoService("reviews", "web", "Customer reviews (nobody calls it yet).", {"v1": Behaviour(5)}),
)  # fmt: skip

# The load generator is a caller with an agent of its own (so its edge shows in the topology).
LOADGEN = DemoService(
    "loadgen", "web", "Steady, gentle demo traffic.", {"v1": Behaviour(0)}, (Call("frontend", "/"),)
)

# The canary the console is for: catalog starts at 90 % v1, 10 % v2.
INITIAL_WEIGHTS = {"catalog": {"v1": 90, "v2": 10}}
