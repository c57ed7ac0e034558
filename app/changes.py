"""What a transaction changed that agents must hear about.

Services note here which catalog services their write touched (and which recorded config
changes wait for agents); after the transaction commits, the push hub (``app.agents.hub``)
recompiles exactly those services' part of the config. Nothing is pushed for a write that rolls
back, and nothing is recompiled for a write that touched nothing agents see.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

__all__ = ["MESH_WIDE", "pending_changes", "record_change", "touched", "touched_services"]

_TOUCHED = "mesh.touched"
_CHANGES = "mesh.changes"

# Stands for "every service" (the mesh-wide defaults changed).
MESH_WIDE = ("*", "*")


def touched(session: Session, namespace: str, name: str) -> None:
    session.info.setdefault(_TOUCHED, set()).add((namespace, name))


def record_change(session: Session, change_id: int) -> None:
    session.info.setdefault(_CHANGES, []).append(change_id)


def touched_services(session: Session) -> set[tuple[str, str]]:
    """Take (and clear) what the transaction touched."""
    result: set[tuple[str, str]] = session.info.pop(_TOUCHED, set())
    return result


def pending_changes(session: Session) -> list[int]:
    result: list[int] = session.info.pop(_CHANGES, [])
    return result
