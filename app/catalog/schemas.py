"""Request and response shapes for the catalog. Unknown fields are refused so a typo in a
field name is an error rather than a silently ignored change."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, HttpUrl, StringConstraints

from app.text import VISIBLE_LINE, VISIBLE_LINES

# Patterns are matched with fullmatch: with re.match and "$", "reviews\n" was a valid name
# ("$" also matches before a final newline).
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Kubernetes-style label keys: optional DNS prefix, then a name of up to 63 characters.
LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
VERSION_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
INSTANCE_ADDRESS = re.compile(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}")
MAX_LABELS = 64
MAX_LINKS = 20
MAX_DEPENDENCIES = 200


def _dns_label(value: str) -> str:
    if not DNS_LABEL.fullmatch(value):
        raise ValueError(
            "must be a DNS label: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def _version_name(value: str) -> str:
    if not VERSION_NAME.fullmatch(value):
        raise ValueError(
            "may contain only lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return value


def _instance_address(value: str) -> str:
    if not INSTANCE_ADDRESS.fullmatch(value):
        raise ValueError("must be host:port, e.g. 10.0.0.7:9080 or [fd00::7]:9080")
    return value


def _labels(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels")
    for key, label_value in value.items():
        if len(key) > 253 or not LABEL_KEY.fullmatch(key):
            raise ValueError(f"label key {key!r} is not a valid label key")
        if len(label_value) > 63 or not LABEL_VALUE.fullmatch(label_value):
            raise ValueError(
                f"label {key!r}: value {label_value!r} must be at most 63 letters, digits, "
                "'-', '_' or '.', starting and ending with a letter or digit"
            )
    return value


def _dependencies(value: list[str]) -> list[str]:
    """``name`` (same namespace) or ``namespace/name``; duplicates refused, order kept."""
    seen: set[str] = set()
    for item in value:
        parts = item.split("/")
        if len(parts) > 2 or not all(
            DNS_LABEL.fullmatch(part) and len(part) <= 63 for part in parts
        ):
            raise ValueError(f"{item!r} is not a service name or namespace/name")
        if item in seen:
            raise ValueError(f"{item!r} is listed twice")
        seen.add(item)
    return value


DnsLabel = Annotated[
    str, StringConstraints(min_length=1, max_length=63), AfterValidator(_dns_label)
]
Labels = Annotated[dict[str, str], AfterValidator(_labels)]
Dependencies = Annotated[
    list[str], Field(max_length=MAX_DEPENDENCIES), AfterValidator(_dependencies)
]
TeamName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=63), VISIBLE_LINE
]
Description = Annotated[str, StringConstraints(max_length=4000), VISIBLE_LINES]
VersionName = Annotated[
    str, StringConstraints(min_length=1, max_length=63), AfterValidator(_version_name)
]
Reason = Annotated[str, StringConstraints(max_length=1000), VISIBLE_LINE]
"""Why a change is made, stored in its audit event."""
Health = Literal["healthy", "unhealthy", "unknown"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Link(Strict):
    title: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), VISIBLE_LINE
    ]
    url: HttpUrl


class ServiceCreate(Strict):
    namespace: DnsLabel = "default"
    name: DnsLabel
    owner_team: TeamName
    description: Description = ""
    links: Annotated[list[Link], Field(max_length=MAX_LINKS)] = []
    labels: Labels = {}
    dependencies: Dependencies = []


class ServiceUpdate(Strict):
    """Partial update. ``revision`` is the revision the caller read; if someone changed the
    service since, the update is refused with 409."""

    revision: int = Field(ge=1)
    owner_team: TeamName | None = None
    description: Description | None = None
    links: Annotated[list[Link], Field(max_length=MAX_LINKS)] | None = None
    labels: Labels | None = None
    dependencies: Dependencies | None = None


class VersionCreate(Strict):
    name: VersionName
    labels: Labels = {}


class VersionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    labels: dict[str, str]
    created_at: datetime


class InstanceCreate(Strict):
    address: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=3, max_length=255),
        AfterValidator(_instance_address),
    ]
    version: VersionName
    health: Health = "unknown"


class InstanceRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    address: str
    version: str
    health: str
    last_seen_at: datetime | None
    created_at: datetime


class ServiceSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    namespace: str
    name: str
    owner_team: str
    description: str
    labels: dict[str, str]
    dependencies: list[str]
    revision: int
    created_at: datetime
    updated_at: datetime


class ServiceRead(ServiceSummary):
    links: list[Link]
    versions: list[VersionRead]
    instances: list[InstanceRead]


class ServiceList(BaseModel):
    items: list[ServiceSummary]
    total: int
    page: int
    page_size: int
    pages: int
