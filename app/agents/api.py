"""The agents' side of the API (registration and the discovery long poll, both behind the join
token) and the operators' side (``GET /api/v1/agents``: proxy status; changes and how far
they got)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from starlette.datastructures import State

from app.agents import service
from app.agents.hub import PushHub
from app.agents.join import JoinGrants
from app.agents.models import Agent, ConfigChange
from app.agents.schemas import AgentList, AgentRegistered
from app.agents.status import SyncState
from app.deps import SessionDep
from app.errors import DomainError, NotFoundError
from app.identity.principal import ForbiddenError
from app.policies.schemas import ChangeRead
from mesh_agent.protocol import AgentRegistration, DiscoveryRequest

log = logging.getLogger("mesh.agents")

# What agents call, with the join token (no console sign-in): registration and discovery.
agent_router = APIRouter(prefix="/api/v1", tags=["agents"])
# What people and meshctl read about agents and changes (signed in, like the rest of the API).
router = APIRouter(prefix="/api/v1", tags=["agents"])


# The dependencies of the discovery route are ``async def`` on purpose: FastAPI runs a plain
# ``def`` dependency in the thread pool, and that hop on every poll was ~15 % of the control
# plane's CPU per change (bench/push.py). Neither blocks: the token check is a stat() of the
# token file.
async def get_hub(request: Request) -> PushHub:
    hub: PushHub = request.app.state.hub
    return hub


HubDep = Annotated[PushHub, Depends(get_hub)]


class Unauthorized(DomainError):
    status_code = 401


_last_auth_log = [0.0, 0]


async def require_agent_token(request: Request, hub: HubDep) -> None:
    """Agents present the mesh join token as a bearer token; anything else is refused (401),
    counted, and logged at most once a minute (a misconfigured fleet must not flood the log)."""
    request.state.join_namespace = await agent_token_namespace(
        hub,
        request.app.state,
        request.headers.get("authorization", ""),
        request.client.host if request.client else None,
    )


async def agent_token_namespace(
    hub: PushHub, state: State, authorization: str, client: str | None
) -> str | None:
    """The namespace a bearer join token admits to (None: the mesh-wide token file, any
    namespace); raises Unauthorized. The checks of :func:`require_agent_token`, for callers
    without a Request (the OTLP receiver's ASGI path, app.telemetry.asgi).

    Neither check touches the database on the hot path: the token file is re-read when its
    modification time changes, looked at no more than every ``app.agents.token.RECHECK_S``
    (1 s), and database join tokens are remembered ``app.agents.join.RECHECK_S`` (5 s) after
    each lookup; those are the longest a rotated or revoked token keeps working."""
    scheme, _, presented = authorization.partition(" ")
    presented = presented.strip()
    if scheme.lower() == "bearer" and presented:
        if hub.token.check(presented):
            return None
        grant = await _join_grants(state).grant(presented)
        if grant is not None:
            return grant.namespace
    hub.metrics.unauthorized.inc()
    now = time.monotonic()
    _last_auth_log[1] += 1
    if now - _last_auth_log[0] >= 60:
        log.warning(
            "refused %d agent request(s) without a valid join token (latest from %s)",
            _last_auth_log[1],
            client or "?",
        )
        _last_auth_log[0], _last_auth_log[1] = now, 0
    raise Unauthorized("a valid mesh join token is required (Authorization: Bearer <token>)")


def _join_grants(state: State) -> JoinGrants:
    grants: JoinGrants | None = getattr(state, "join_grants", None)
    if grants is None:
        grants = state.join_grants = JoinGrants(state.database)
    return grants


AgentAuth = Depends(require_agent_token)

# At most this many registrations hold a worker thread and a database connection at a time.
# After a control-plane restart every agent registers again at once; unqueued, those requests
# took the whole thread pool and connection pool (SQLite has one writer anyway, so they mostly
# waited for its lock) and a person's console page waited ~10 s behind them (bench/push.py).
# Queued here they wait as coroutines on the loop instead.
REGISTRATIONS_AT_ONCE = 4


async def _registration_slot(request: Request) -> AsyncIterator[None]:
    state = request.app.state
    gate: asyncio.Semaphore | None = getattr(state, "registration_gate", None)
    if gate is None:
        gate = state.registration_gate = asyncio.Semaphore(REGISTRATIONS_AT_ONCE)
    async with gate:
        yield


RegistrationSlot = Depends(_registration_slot, scope="function")


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], raw: bytes) -> M:
    """Wire data from agents: malformed input is a 400 (not FastAPI's 422), naming the field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise DomainError(f"malformed request: {problems}") from None


async def _registration(request: Request) -> AgentRegistration:
    return _parse(AgentRegistration, await request.body())


async def _discovery(request: Request) -> DiscoveryRequest:
    return _parse(DiscoveryRequest, await request.body())


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


@agent_router.post(
    "/agents",
    response_model=AgentRegistered,
    dependencies=[AgentAuth, RegistrationSlot],
    summary="Register an agent (called by mesh-agent)",
    description="Creates the service, version and instance in the catalog if they are new "
    "(audited with the agent as actor). Idempotent for the same agent_id.",
    openapi_extra=_body_schema(AgentRegistration),
)
def register_agent(
    request: Request,
    session: SessionDep,
    hub: HubDep,
    data: Annotated[AgentRegistration, Depends(_registration)],
) -> AgentRegistered:
    allowed = getattr(request.state, "join_namespace", None)
    if allowed is not None and data.namespace != allowed:
        raise ForbiddenError(
            f"this join token admits agents of namespace {allowed!r} only, not {data.namespace!r}"
        )
    state = service.register(session, data)
    session.commit()
    hub.status.put(state)
    hub.kick()
    return AgentRegistered(agent_id=state.agent_id, poll_hold_s=hub.settings.poll_hold_s)


@agent_router.delete(
    "/agents/{agent_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[AgentAuth],
    summary="Deregister an agent (called by mesh-agent when it shuts down)",
)
def deregister_agent(request: Request, session: SessionDep, hub: HubDep, agent_id: str) -> Response:
    allowed = getattr(request.state, "join_namespace", None)
    if allowed is not None:
        namespace = session.scalar(select(Agent.namespace).where(Agent.agent_id == agent_id))
        if namespace is not None and namespace != allowed:
            raise ForbiddenError(f"this join token admits agents of namespace {allowed!r} only")
    service.deregister(session, agent_id)
    session.commit()
    hub.status.remove(agent_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@agent_router.post(
    "/agents/{agent_id}/discovery",
    dependencies=[AgentAuth],
    summary="Discovery long poll (called by mesh-agent)",
    description="The body ACKs or NACKs the previous response (xDS semantics: an answer to a "
    "nonce other than the last one sent is ignored). The control plane answers at once with "
    "the group's snapshot when the agent does not run it yet (and did not refuse it), else "
    "holds the request until the snapshot changes or `poll_hold_s` passes (204).",
    responses={
        200: {"description": "A DiscoveryResponse: version, nonce, config."},
        204: {"description": "Nothing changed while the poll was held; poll again."},
        404: {"description": "Unknown agent: register again."},
    },
    openapi_extra=_body_schema(DiscoveryRequest),
)
async def discovery(
    request: Request,
    hub: HubDep,
    agent_id: str,
    data: Annotated[DiscoveryRequest, Depends(_discovery)],
) -> Response:
    allowed = getattr(request.state, "join_namespace", None)
    if allowed is not None:
        known = hub.status.get(agent_id)
        if known is not None and known.namespace != allowed:
            raise ForbiddenError(f"this join token admits agents of namespace {allowed!r} only")
    booked = hub.status.poll_started(
        agent_id, version=data.version, nonce=data.response_nonce, error=data.error_detail
    )
    if booked is None:
        raise NotFoundError(f"agent {agent_id!r} is not registered")
    state, answer = booked
    if hub.status.revive(agent_id) is not None:
        hub.kick([state.group])  # its endpoint comes back into its callers' config
    hub.answered(state, answer)
    try:
        snap = await hub.cache.wait(
            state.group, {data.version, state.nacked_version}, hub.settings.poll_hold_s
        )
    finally:
        hub.status.poll_ended(agent_id)
    if snap is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    nonce = uuid.uuid4().hex[:16]
    hub.status.sent(agent_id, snap.version, nonce)
    hub.metrics.pushes.inc()
    return Response(snap.body(nonce), media_type="application/json")


@router.get("/agents", response_model=AgentList, summary="Agents and their sync state")
def list_agents(
    hub: HubDep,
    namespace: Annotated[str | None, Query(max_length=63)] = None,
    service_name: Annotated[str | None, Query(alias="service", max_length=63)] = None,
    state: SyncState | None = None,
) -> AgentList:
    items, counts = service.list_agents(hub, namespace=namespace, service=service_name, state=state)
    return AgentList(items=items, total=len(items), counts=counts)


def change_read(row: ConfigChange, hub: PushHub) -> ChangeRead:
    """A change as stored, overlaid with its live progress while it is still moving."""
    read = ChangeRead.model_validate(row)
    live = hub.progress(row.id)
    if live is not None:
        read = read.model_copy(
            update={
                "state": live.state,
                "targeted": len(live.targets),
                "synced": len(live.synced),
                "nacked": len(live.nacked),
                "errors": live.errors(),
                "duration_ms": live.duration_ms,
            }
        )
    return read


@router.get("/changes/{change_id}", response_model=ChangeRead, summary="One change's progress")
def get_change(
    session: SessionDep, hub: HubDep, change_id: Annotated[int, Path(ge=1, le=2**31 - 1)]
) -> ChangeRead:
    row = session.scalar(select(ConfigChange).where(ConfigChange.id == change_id))
    if row is None:
        raise NotFoundError(f"no change {change_id}")
    return change_read(row, hub)
