from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class AuditEventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    occurred_at: datetime
    actor: str
    actor_id: str
    client_address: str
    action: str
    resource_kind: str
    resource_name: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str
    prev_hash: str
    hash: str


class AuditEventList(BaseModel):
    items: list[AuditEventRead]
    total: int
    page: int
    page_size: int
    pages: int


class ChainVerificationRead(BaseModel):
    ok: bool
    checked: int
    first_broken_seq: int | None
    detail: str
    signed_up_to: int | None = None
    """The newest event covered by a signed checkpoint the chain agrees with."""
