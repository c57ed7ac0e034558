from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from app.catalog.schemas import DnsLabel, TeamName
from app.text import VISIBLE_LINE

RoleName = Literal["viewer", "operator", "admin"]

# Deliberately loose (RFC 5322 allows much more): one @, something on each side, no spaces.
# Sign-in compares addresses, it does not deliver mail.
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def _email(value: str) -> str:
    value = value.strip().lower()
    if not _EMAIL.fullmatch(value):
        raise ValueError("enter an e-mail address such as ada@example.com")
    return value


Email = Annotated[str, StringConstraints(max_length=254), VISIBLE_LINE, AfterValidator(_email)]
DisplayName = Annotated[str, StringConstraints(strip_whitespace=True, max_length=255), VISIBLE_LINE]
TokenName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=63), VISIBLE_LINE
]
Password = Annotated[str, StringConstraints(max_length=1024)]
ExpiryDays = Annotated[int, Field(ge=1, le=3650)]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email
    display_name: DisplayName = ""
    role: RoleName = "viewer"
    teams: Annotated[list[TeamName], Field(max_length=50)] = []
    password: Password | None = None
    """Empty: the person signs in with a one-time link (or single sign-on)."""


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    display_name: DisplayName | None = None
    role: RoleName | None = None
    teams: Annotated[list[TeamName], Field(max_length=50)] | None = None
    disabled: bool | None = None


class UserRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    display_name: str
    role: RoleName
    teams: list[str]
    disabled: bool
    locked: bool
    single_sign_on: bool
    created_at: datetime
    last_sign_in_at: datetime | None


class TeamRead(BaseModel):
    name: str
    members: list[str]
    services: int


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: TokenName
    role: RoleName = "viewer"
    team: TeamName | None = None
    """Narrow the token to one of your teams' services (operators)."""
    expires_in_days: ExpiryDays = 90


class JoinTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: TokenName
    namespace: DnsLabel
    expires_in_days: ExpiryDays = 365


class TokenRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: Literal["api", "join"]
    name: str
    prefix: str
    owner: str | None
    role: RoleName
    team: str | None
    namespace: str | None
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    active: bool


class TokenCreated(BaseModel):
    token: str
    """The secret: shown this once, stored only as a digest."""
    details: TokenRead


class SessionRead(BaseModel):
    id: int
    user: str
    method: str
    client_address: str
    user_agent: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    current: bool


class SignInFailureRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    occurred_at: datetime
    email: str
    client_address: str
    reason: str


class Me(BaseModel):
    kind: str
    name: str
    role: RoleName
    teams: list[str]
