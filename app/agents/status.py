"""What each agent was sent, ACKed and NACKed, and whether it is connected.

Kept in memory (an ACK is a dictionary update, not a database write: a thousand agents ACK a
change within a second) and written to the ``agents`` table in batches by the hub.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum

from app.agents.snapshot import GroupKey

__all__ = ["AgentState", "StatusRegistry", "SyncState"]


class SyncState(StrEnum):
    SYNCED = "SYNCED"  # ACKed the latest snapshot of its group
    STALE = "STALE"  # the latest was sent, no answer yet
    NACKED = "NACKED"  # refused the latest, serving its previous config
    NOT_SENT = "NOT_SENT"  # the latest has not been sent yet
    DISCONNECTED = "DISCONNECTED"  # no open poll for a while


@dataclass
class AgentState:
    agent_id: str
    namespace: str
    service: str
    version: str
    address: str
    agent_version: str
    instance_id: int | None
    registered_at: datetime
    last_seen: float  # time.time()
    polling: int = 0
    sent_version: str | None = None
    sent_nonce: str | None = None
    sent_at: float | None = None
    acked_version: str | None = None
    acked_at: float | None = None
    nacked_version: str | None = None
    last_error: str | None = None
    expired: bool = False  # disconnected past the grace period: its endpoint is withdrawn
    dirty: bool = True  # not yet written to the database

    @property
    def group(self) -> GroupKey:
        return (self.namespace, self.service)

    @property
    def last_seen_at(self) -> datetime:
        return datetime.fromtimestamp(self.last_seen, UTC)

    def sync_state(self, current: str | None, disconnect_after_s: float, now: float) -> SyncState:
        if self.polling == 0 and now - self.last_seen > disconnect_after_s:
            return SyncState.DISCONNECTED
        if current is not None and self.acked_version == current:
            return SyncState.SYNCED
        if current is not None and self.sent_version == current:
            return SyncState.NACKED if self.nacked_version == current else SyncState.STALE
        return SyncState.NOT_SENT


@dataclass(frozen=True)
class Answer:
    """What a discovery request told us: an ACK or NACK of a version, or nothing new."""

    acked: str | None = None
    nacked: str | None = None
    error: str | None = None


class StatusRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._agents: dict[str, AgentState] = {}

    def put(self, state: AgentState) -> None:
        with self._lock:
            old = self._agents.get(state.agent_id)
            if old is not None:
                # A re-registration keeps what we know of its sync history and open polls.
                state.polling = old.polling
                state.sent_version, state.sent_nonce = old.sent_version, old.sent_nonce
                state.acked_version, state.nacked_version = old.acked_version, old.nacked_version
                state.last_error = old.last_error
            self._agents[state.agent_id] = state

    def remove(self, agent_id: str) -> AgentState | None:
        with self._lock:
            return self._agents.pop(agent_id, None)

    def get(self, agent_id: str) -> AgentState | None:
        with self._lock:
            state = self._agents.get(agent_id)
            return None if state is None else replace(state)

    def all(self) -> list[AgentState]:
        with self._lock:
            return [replace(state) for state in self._agents.values()]

    def groups(self) -> set[GroupKey]:
        with self._lock:
            return {state.group for state in self._agents.values()}

    def poll_started(
        self,
        agent_id: str,
        *,
        version: str | None,
        nonce: str | None,
        error: str | None,
    ) -> tuple[AgentState, Answer] | None:
        """Book an incoming poll: its ACK or NACK (xDS rules: an answer to a nonce other than
        the last one sent is stale and ignored), and the agent as connected."""
        now = time.time()
        with self._lock:
            state = self._agents.get(agent_id)
            if state is None:
                return None
            state.polling += 1
            state.last_seen = now
            state.dirty = True
            answer = Answer()
            if nonce is None:
                # A fresh connection: the agent tells what it runs (its persisted config).
                if version is not None and version != state.acked_version:
                    state.acked_version, state.acked_at = version, now
                    answer = Answer(acked=version)
                state.sent_nonce = None
            elif nonce == state.sent_nonce:
                state.sent_nonce = None
                if error:
                    state.nacked_version, state.last_error = state.sent_version, error[:4000]
                    answer = Answer(nacked=state.sent_version, error=state.last_error)
                else:
                    state.acked_version, state.acked_at = version, now
                    state.nacked_version, state.last_error = None, None
                    answer = Answer(acked=version)
            return replace(state), answer

    def poll_ended(self, agent_id: str) -> None:
        with self._lock:
            state = self._agents.get(agent_id)
            if state is not None:
                state.polling = max(0, state.polling - 1)
                state.last_seen = time.time()
                state.dirty = True

    def sent(self, agent_id: str, version: str, nonce: str) -> None:
        with self._lock:
            state = self._agents.get(agent_id)
            if state is not None:
                state.sent_version, state.sent_nonce, state.sent_at = version, nonce, time.time()
                state.dirty = True

    def expire(
        self, disconnect_after_s: float, grace_s: float, not_before: float = 0.0
    ) -> list[AgentState]:
        """Mark agents gone for longer than the grace period; returns those newly expired.

        ``not_before`` (the control plane's start) keeps a restarted control plane from
        withdrawing every endpoint before its agents had a chance to reconnect."""
        now = time.time()
        newly: list[AgentState] = []
        with self._lock:
            for state in self._agents.values():
                seen = max(state.last_seen, not_before)
                gone = state.polling == 0 and now - seen > disconnect_after_s + grace_s
                if gone and not state.expired:
                    state.expired = state.dirty = True
                    newly.append(replace(state))
        return newly

    def revive(self, agent_id: str) -> AgentState | None:
        """An expired agent polls again: its endpoint comes back. Returns it if it was expired."""
        with self._lock:
            state = self._agents.get(agent_id)
            if state is None or not state.expired:
                return None
            state.expired = False
            state.dirty = True
            return replace(state)

    def expired_instances(self) -> set[int]:
        with self._lock:
            return {s.instance_id for s in self._agents.values() if s.expired and s.instance_id}

    def take_dirty(self) -> list[AgentState]:
        with self._lock:
            dirty = [replace(s) for s in self._agents.values() if s.dirty]
            for state in self._agents.values():
                state.dirty = False
            return dirty
