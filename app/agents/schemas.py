from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from app.agents.status import SyncState


class AgentRegistered(BaseModel):
    agent_id: str
    poll_hold_s: float
    """How long the control plane holds a discovery poll open when nothing changes."""


class AgentRead(BaseModel):
    """One row of ``meshctl proxy-status``."""

    agent_id: str
    namespace: str
    service: str
    version: str
    address: str
    agent_version: str
    sync_state: SyncState
    config_version: str | None
    """The config version the agent runs (its last ACK)."""
    latest_version: str | None
    """The latest snapshot of its group."""
    last_seen_at: datetime
    last_error: str | None
    registered_at: datetime


class AgentList(BaseModel):
    items: list[AgentRead]
    total: int
    counts: dict[str, int]
    """Agents per sync state."""
