"""Registering and listing agents. Registration writes the catalog like any other change (the
service, version and instance are created if new, audited with the agent as actor)."""

from __future__ import annotations

import contextlib

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.agents.hub import PushHub
from app.agents.models import Agent
from app.agents.schemas import AgentRead
from app.agents.status import AgentState, SyncState
from app.catalog import service as catalog
from app.catalog.models import Instance, Service
from app.catalog.schemas import InstanceCreate, ServiceCreate, VersionCreate
from app.changes import touched
from app.db import utcnow
from app.errors import NotFoundError
from app.identity.principal import Principal
from mesh_agent.protocol import AgentRegistration

UNOWNED_TEAM = "unowned"


def agent_actor(agent_id: str) -> Principal:
    return Principal.agent(agent_id)


def register(session: Session, data: AgentRegistration) -> AgentState:
    """Write the registration; the caller publishes the returned state to the hub once the
    transaction has committed (a rolled-back registration must leave no trace)."""
    actor = agent_actor(data.agent_id)
    reason = f"registered by mesh-agent {data.agent_id}"
    try:
        service = catalog.get_service(session, data.namespace, data.service)
    except NotFoundError:
        catalog.create_service(
            session,
            actor,
            data=ServiceCreate(
                namespace=data.namespace, name=data.service, owner_team=UNOWNED_TEAM
            ),
            reason=reason,
        )
        service = catalog.get_service(session, data.namespace, data.service)
    if not any(v.name == data.version for v in service.versions):
        catalog.create_version(
            session,
            actor,
            namespace=data.namespace,
            name=data.service,
            data=VersionCreate(name=data.version),
            reason=reason,
        )
        session.expire(service, ["versions", "instances"])
        service = catalog.get_service(session, data.namespace, data.service)
    instance_id = None
    now = utcnow()
    if data.address is not None:  # an agent without an inbound listener takes no traffic
        instance_id = _ensure_instance(session, actor, service, data, reason).id
    agent = session.scalar(select(Agent).where(Agent.agent_id == data.agent_id))
    if agent is None:
        agent = Agent(agent_id=data.agent_id, registered_at=now)
        session.add(agent)
    moved = (agent.namespace, agent.service) if agent.service else None
    agent.namespace, agent.service, agent.version = data.namespace, data.service, data.version
    agent.address, agent.agent_version = data.address or "", data.agent_version
    agent.instance_id, agent.last_seen_at = instance_id, now
    session.flush()
    if moved and moved != (data.namespace, data.service):
        touched(session, *moved)
    touched(session, data.namespace, data.service)
    return AgentState(
        agent_id=agent.agent_id,
        namespace=agent.namespace,
        service=agent.service,
        version=agent.version,
        address=agent.address,
        agent_version=agent.agent_version,
        instance_id=instance_id,
        registered_at=agent.registered_at,
        last_seen=now.timestamp(),
    )


def _ensure_instance(
    session: Session, actor: Principal, service: Service, data: AgentRegistration, reason: str
) -> Instance:
    assert data.address is not None
    instance = next((i for i in service.instances if i.address == data.address), None)
    if instance is not None and instance.version != data.version:
        catalog.delete_instance(
            session,
            actor,
            namespace=data.namespace,
            name=data.service,
            address=data.address,
            reason=f"{reason} as {data.version}",
        )
        instance = None
    if instance is None:
        instance = catalog.create_instance(
            session,
            actor,
            namespace=data.namespace,
            name=data.service,
            data=InstanceCreate(address=data.address, version=data.version, health="healthy"),
            reason=reason,
        )
    instance.last_seen_at = utcnow()
    return instance


def deregister(session: Session, agent_id: str) -> None:
    """An agent shutting down: its endpoint leaves its callers' config right away."""
    agent = session.scalar(select(Agent).where(Agent.agent_id == agent_id))
    if agent is None:
        raise NotFoundError(f"no agent {agent_id!r}")
    service = session.scalar(
        select(Service).where(Service.namespace == agent.namespace, Service.name == agent.service)
    )
    if service is not None and agent.instance_id is not None:
        with contextlib.suppress(NotFoundError):
            catalog.delete_instance(
                session,
                agent_actor(agent_id),
                namespace=agent.namespace,
                name=agent.service,
                address=agent.address,
                reason="mesh-agent shut down",
            )
    session.execute(delete(Agent).where(Agent.agent_id == agent_id))
    touched(session, agent.namespace, agent.service)


def list_agents(
    hub: PushHub,
    *,
    namespace: str | None = None,
    service: str | None = None,
    state: SyncState | None = None,
) -> tuple[list[AgentRead], dict[str, int]]:
    """Every known agent with its sync state, like ``istioctl proxy-status``; ``counts`` are
    over the namespace/service filter, before the state filter."""
    rows: list[AgentRead] = []
    counts = {s.value: 0 for s in SyncState}
    for agent in hub.status.all():
        if namespace and agent.namespace != namespace:
            continue
        if service and agent.service != service:
            continue
        sync = hub.sync_state(agent)
        counts[sync.value] += 1
        if state is not None and sync is not state:
            continue
        rows.append(
            AgentRead(
                agent_id=agent.agent_id,
                namespace=agent.namespace,
                service=agent.service,
                version=agent.version,
                address=agent.address,
                agent_version=agent.agent_version,
                sync_state=sync,
                config_version=agent.acked_version,
                latest_version=hub.current_version(agent.group),
                last_seen_at=agent.last_seen_at,
                last_error=agent.last_error if sync is SyncState.NACKED else None,
                registered_at=agent.registered_at,
            )
        )
    rows.sort(key=lambda a: (a.namespace, a.service, a.version, a.address))
    return rows, counts
