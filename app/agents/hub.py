"""The push hub: keeps every agent group's snapshot current and tracks each change to the end.

One compiler thread does all the database reading and compiling, so requests never wait for it
and changes are applied in commit order. A write's transaction notes what it touched
(:mod:`app.changes`); after it commits, the thread recompiles exactly those services' parts,
rebuilds only the groups that can see them, and stores a new snapshot only when the content
hash changed, which wakes the held polls of that group and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, func, or_, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app.agents.cache import SnapshotCache
from app.agents.metrics import PushMetrics
from app.agents.models import Agent, ConfigChange
from app.agents.snapshot import (
    GroupKey,
    ServicePart,
    ServiceState,
    build_group_config,
    compile_part,
    normalise_dependencies,
)
from app.agents.status import AgentState, Answer, StatusRegistry, SyncState
from app.agents.token import JoinToken
from app.catalog.models import Instance, Service
from app.changes import MESH_WIDE, pending_changes, touched_services
from app.config import Settings
from app.db import Database
from app.policies.models import TrafficPolicyRevision
from app.policies.schemas import MeshDefaultsSpec, TrafficPolicySpec

__all__ = ["ChangeProgress", "PushHub"]

log = logging.getLogger("mesh.push")

_TICK_S = 0.25
_FLUSH_EVERY_S = 1.0
_KEEP_DONE_S = 300.0
# After a (re)start no endpoint is withdrawn for this long, whatever the grace setting: the
# agents reconnect within their backoff (5 s cap) and must not find their callers' config
# emptied of the peers that simply had not polled the new process yet.
RESTART_GRACE_S = 30.0


@dataclass
class ChangeProgress:
    """Live progress of one change; written to its ``config_changes`` row as it moves."""

    id: int
    created: float
    deadline: float
    state: str = "pending"
    targets: dict[str, tuple[GroupKey, int]] = field(default_factory=dict)
    synced: dict[str, float] = field(default_factory=dict)
    nacked: dict[str, str] = field(default_factory=dict)
    duration_ms: int | None = None
    finished_at: float | None = None
    dirty: bool = True

    def errors(self) -> list[dict[str, Any]]:
        return [{"agent_id": a, "error": e} for a, e in sorted(self.nacked.items())]

    def settle(self, now: float, *, deadline_passed: bool = False) -> None:
        if self.state != "pending":
            return
        answered = len(self.synced) + len(self.nacked)
        if answered < len(self.targets) and not deadline_passed:
            return
        if answered == len(self.targets) and not self.nacked:
            self.state = "converged" if self.targets else "idle"
        else:
            self.state = "partial"
        last = max(self.synced.values(), default=now) if self.targets else self.created
        if deadline_passed or self.nacked:
            last = now if deadline_passed else max(last, now)
        self.duration_ms = max(0, round((last - self.created) * 1000))
        self.finished_at = now
        self.dirty = True


class PushHub:
    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings
        self.cache = SnapshotCache()
        self.status = StatusRegistry()
        self.token = JoinToken(settings.effective_join_token_file)
        self.metrics = PushMetrics()
        self._queue: queue.SimpleQueue[tuple[set[GroupKey], list[int], bool]] = queue.SimpleQueue()
        self._parts: dict[GroupKey, ServicePart] = {}
        self._progress: dict[int, ChangeProgress] = {}
        self._progress_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self.started_at = time.time()
        self._listening = False
        # Its own session factory: the hub's background reads are not the requests' reads
        # (listeners and counters on the app's sessions see requests only).
        self._read_sessions = sessionmaker(database.engine, expire_on_commit=False)

    # -----------------------------------------------------------------------------------------
    # Lifecycle

    def start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.cache.loop = loop
        self.token.ensure()
        self.started_at = time.time()
        self._load_agents()
        for maker in (self.database.write_sessions, self.database.read_sessions):
            sa_event.listen(maker, "after_commit", self._after_commit)
            sa_event.listen(maker, "after_rollback", self._after_rollback)
        self._listening = True
        self._stopping.clear()
        self._queue.put((set(), [], True))  # full compile first
        self._thread = threading.Thread(target=self._run, name="mesh-push", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._listening:
            for maker in (self.database.write_sessions, self.database.read_sessions):
                sa_event.remove(maker, "after_commit", self._after_commit)
                sa_event.remove(maker, "after_rollback", self._after_rollback)
            self._listening = False
        self._stopping.set()
        self._queue.put((set(), [], False))
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with contextlib.suppress(Exception):
            self._flush()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """True once the first full compile is done (tests and the demo wait for it)."""
        return self._ready.wait(timeout)

    def _after_commit(self, session: Session) -> None:
        keys = touched_services(session)
        changes = pending_changes(session)
        if keys or changes:
            self._queue.put((keys, changes, False))

    def _after_rollback(self, session: Session) -> None:
        touched_services(session)
        pending_changes(session)

    def kick(self, keys: Iterable[GroupKey] = ()) -> None:
        """Recompile ``keys`` (and build any group that has agents but no snapshot yet)."""
        self._queue.put((set(keys), [], False))

    # -----------------------------------------------------------------------------------------
    # The compiler thread

    def _run(self) -> None:
        last_flush = 0.0
        failures = 0
        while not self._stopping.is_set():
            keys: set[GroupKey] = set()
            changes: list[int] = []
            full = False
            try:
                item = self._queue.get(timeout=_TICK_S)
                while True:
                    keys |= item[0]
                    changes += item[1]
                    full = full or item[2]
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            if self._stopping.is_set():
                break
            try:
                if keys or changes or full:
                    self._compile(keys, changes, full=full)
                    self._ready.set()
                now = time.time()
                self._check_agents(now)
                self._check_deadlines(now)
                if now - last_flush >= _FLUSH_EVERY_S:
                    self._flush()
                    last_flush = now
                failures = 0
            except Exception:
                # The thread must survive a database outage: agents keep their config, and the
                # work is retried with a growing pause (capped), logged once per failure streak.
                if failures == 0:
                    log.exception("push hub: compile or flush failed; retrying")
                failures += 1
                if keys or changes or full:
                    self._stopping.wait(min(5.0, _TICK_S * 2**failures))
                    self._queue.put((keys, changes, full))

    def _compile(self, keys: set[GroupKey], change_ids: list[int], *, full: bool) -> None:
        started = time.perf_counter()
        if MESH_WIDE in keys:
            full = True
        with self._read_sessions() as session:
            defaults = _current_defaults(session)
            states = _load_states(session, None if full else keys, self.status.expired_instances())
            rows = (
                list(session.scalars(select(ConfigChange).where(ConfigChange.id.in_(change_ids))))
                if change_ids
                else []
            )
        changed: set[GroupKey] = set()
        if full:
            gone = set(self._parts) - {s.key for s in states}
            for key in gone:
                del self._parts[key]
            changed |= gone
        else:
            for key in keys - {s.key for s in states}:
                if self._parts.pop(key, None) is not None:
                    changed.add(key)
        for state in states:
            part = compile_part(state, defaults)
            old = self._parts.get(state.key)
            if old is None or old.digest != part.digest or old.dependencies != part.dependencies:
                changed.add(state.key)
            self._parts[state.key] = part
        changed_namespaces = {key[0] for key in changed}
        bumped: dict[GroupKey, int] = {}
        for group in self.status.groups():
            snap = self.cache.get(group)
            own = self._parts.get(group)
            deps = set(own.dependencies) if own else set()
            if snap is not None and not full:
                sees = set(snap.services) | deps | {group}
                if not (changed & sees) and group[0] not in changed_namespaces:
                    continue
            config, version, visible = build_group_config(group, self._parts)
            before = snap.generation if snap is not None else 0
            generation = self.cache.set(group, config, version, visible)
            if generation != before:
                bumped[group] = generation
                self.metrics.snapshots.inc()
        self.metrics.compile_seconds.observe(time.perf_counter() - started)
        if rows:
            self._start_tracking(rows, bumped)

    def _start_tracking(self, rows: list[ConfigChange], bumped: dict[GroupKey, int]) -> None:
        now = time.time()
        agents = self.status.all()
        for row in rows:
            created = row.created_at.timestamp()
            progress = ChangeProgress(
                id=row.id, created=created, deadline=now + self.settings.change_deadline_s
            )
            for agent in agents:
                if agent.group not in bumped:
                    continue
                if self._sync_state(agent, now) is SyncState.DISCONNECTED:
                    continue
                progress.targets[agent.agent_id] = (agent.group, bumped[agent.group])
                # Already answered (it polled between the cache update and this point)? An
                # answer that came before the change was tracked would otherwise be lost.
                self._credit(
                    progress, agent.agent_id, agent.acked_version, agent.nacked_version, now
                )
            progress.settle(now)
            with self._progress_lock:
                self._progress[row.id] = progress

    def _credit(
        self,
        progress: ChangeProgress,
        agent_id: str,
        acked: str | None,
        nacked: str | None,
        now: float,
    ) -> None:
        target = progress.targets.get(agent_id)
        if target is None or agent_id in progress.synced:
            return
        group, required = target
        if acked is not None and self.cache.generation_of(group, acked) >= required:
            progress.synced[agent_id] = now
            progress.nacked.pop(agent_id, None)
            progress.dirty = True
        elif nacked is not None and self.cache.generation_of(group, nacked) >= required:
            state = self.status.get(agent_id)
            progress.nacked[agent_id] = (state.last_error if state else None) or "rejected"
            progress.dirty = True

    def _check_agents(self, now: float) -> None:
        if now - self.started_at < RESTART_GRACE_S:
            return
        gone = self.status.expire(
            self.settings.agent_disconnect_s, self.settings.agent_grace_s, self.started_at
        )
        if gone:
            log.warning(
                "withdrawing endpoints of %d disconnected agent(s): %s",
                len(gone),
                ", ".join(f"{a.namespace}/{a.service} {a.address}" for a in gone[:10]),
            )
            self._queue.put(({a.group for a in gone}, [], False))

    def _check_deadlines(self, now: float) -> None:
        with self._progress_lock:
            for change_id, progress in list(self._progress.items()):
                if progress.state == "pending" and now >= progress.deadline:
                    progress.settle(now, deadline_passed=True)
                if (
                    progress.finished_at is not None
                    and not progress.dirty
                    and now - progress.finished_at > _KEEP_DONE_S
                ):
                    del self._progress[change_id]

    def _flush(self) -> None:
        """Write agent states and change progress that moved since the last flush."""
        dirty = self.status.take_dirty()
        with self._progress_lock:
            moved = [p for p in self._progress.values() if p.dirty]
            for progress in moved:
                progress.dirty = False
        if not dirty and not moved:
            return
        with self.database.session(write=True) as session:
            if dirty:
                # Core statements on the tables (not the ORM entities): one executemany.
                agents = cast(Table, Agent.__table__)
                session.execute(
                    update(agents)
                    .where(agents.c.agent_id == bindparam("b_agent_id"))
                    .values(
                        last_seen_at=bindparam("b_last_seen"),
                        sent_version=bindparam("b_sent"),
                        acked_version=bindparam("b_acked"),
                        nacked_version=bindparam("b_nacked"),
                        last_error=bindparam("b_error"),
                    ),
                    [
                        {
                            "b_agent_id": s.agent_id,
                            "b_last_seen": s.last_seen_at,
                            "b_sent": s.sent_version,
                            "b_acked": s.acked_version,
                            "b_nacked": s.nacked_version,
                            "b_error": s.last_error,
                        }
                        for s in dirty
                    ],
                )
                seen = [s for s in dirty if s.instance_id is not None]
                if seen:
                    instances = cast(Table, Instance.__table__)
                    session.execute(
                        update(instances)
                        .where(instances.c.id == bindparam("b_id"))
                        .values(last_seen_at=bindparam("b_seen")),
                        [{"b_id": s.instance_id, "b_seen": s.last_seen_at} for s in seen],
                    )
            for progress in moved:
                session.execute(
                    update(ConfigChange)
                    .where(ConfigChange.id == progress.id)
                    .values(
                        state=progress.state,
                        targeted=len(progress.targets),
                        synced=len(progress.synced),
                        nacked=len(progress.nacked),
                        errors=progress.errors(),
                        duration_ms=progress.duration_ms,
                    )
                )
            session.commit()

    def _load_agents(self) -> None:
        with self._read_sessions() as session:
            rows = list(session.scalars(select(Agent)))
        for row in rows:
            self.status.put(
                AgentState(
                    agent_id=row.agent_id,
                    namespace=row.namespace,
                    service=row.service,
                    version=row.version,
                    address=row.address,
                    agent_version=row.agent_version,
                    instance_id=row.instance_id,
                    registered_at=row.registered_at,
                    last_seen=row.last_seen_at.timestamp(),
                    sent_version=row.sent_version,
                    acked_version=row.acked_version,
                    nacked_version=row.nacked_version,
                    last_error=row.last_error,
                    dirty=False,
                )
            )

    # -----------------------------------------------------------------------------------------
    # Called from requests

    def answered(self, state: AgentState, answer: Answer) -> None:
        """Credit an agent's ACK or NACK to the changes waiting for it."""
        if answer.acked is None and answer.nacked is None:
            return
        if answer.acked is not None:
            self.metrics.acks.inc()
        if answer.nacked is not None:
            self.metrics.nacks.inc()
        now = time.time()
        with self._progress_lock:
            for progress in self._progress.values():
                if progress.state != "pending" or state.agent_id not in progress.targets:
                    continue
                self._credit(progress, state.agent_id, answer.acked, answer.nacked, now)
                progress.settle(now)
                if progress.state != "pending" and progress.duration_ms is not None:
                    self.metrics.convergence_seconds.observe(progress.duration_ms / 1000)

    def progress(self, change_id: int) -> ChangeProgress | None:
        with self._progress_lock:
            return self._progress.get(change_id)

    def _sync_state(self, agent: AgentState, now: float) -> SyncState:
        snap = self.cache.get(agent.group)
        return agent.sync_state(
            snap.version if snap else None, self.settings.agent_disconnect_s, now
        )

    def sync_state(self, agent: AgentState) -> SyncState:
        return self._sync_state(agent, time.time())

    def warnings(self, key: GroupKey) -> tuple[str, ...]:
        part = self._parts.get(key)
        return part.warnings if part else ()

    def current_version(self, group: GroupKey) -> str | None:
        snap = self.cache.get(group)
        return snap.version if snap else None


# ---------------------------------------------------------------------------------------------
# Database reads for the compiler


def _current_defaults(session: Session) -> MeshDefaultsSpec:
    from app.policies.service import current_defaults

    return current_defaults(session)[0]


def _load_states(
    session: Session, keys: set[GroupKey] | None, excluded_instances: set[int]
) -> list[ServiceState]:
    query = select(Service).options(selectinload(Service.versions), selectinload(Service.instances))
    if keys is not None:
        if not keys:
            return []
        query = query.where(
            or_(*(and_(Service.namespace == ns, Service.name == name) for ns, name in keys))
        )
    services = list(session.scalars(query))
    if not services:
        return []
    ids = [s.id for s in services]
    latest = (
        select(
            TrafficPolicyRevision.service_id,
            func.max(TrafficPolicyRevision.revision).label("revision"),
        )
        .where(TrafficPolicyRevision.service_id.in_(ids))
        .group_by(TrafficPolicyRevision.service_id)
        .subquery()
    )
    specs = {
        row.service_id: TrafficPolicySpec.model_validate(row.spec)
        for row in session.scalars(
            select(TrafficPolicyRevision).join(
                latest,
                and_(
                    TrafficPolicyRevision.service_id == latest.c.service_id,
                    TrafficPolicyRevision.revision == latest.c.revision,
                ),
            )
        )
    }
    states: list[ServiceState] = []
    for service in services:
        endpoints: dict[str, list[str]] = {}
        for instance in service.instances:
            if instance.health == "unhealthy" or instance.id in excluded_instances:
                continue
            endpoints.setdefault(instance.version, []).append(instance.address)
        states.append(
            ServiceState(
                namespace=service.namespace,
                name=service.name,
                versions=tuple(v.name for v in service.versions),
                endpoints={v: tuple(a) for v, a in endpoints.items()},
                dependencies=normalise_dependencies(service.namespace, service.dependencies),
                spec=specs.get(service.id, TrafficPolicySpec()),
            )
        )
    return states


def utc_from_ts(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)
