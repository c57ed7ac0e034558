"""Offset pagination with a stable order (the caller's order plus the primary key)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

T = TypeVar("T")

MAX_PAGE_SIZE = 200
# OFFSET makes the database read and discard every earlier row; past a thousand pages nobody
# is browsing any more, and a request for page 1,000,000 is only a way to load the server.
# Narrow the filters instead.
MAX_PAGE = 1000

PageNumber = Annotated[
    int,
    Query(ge=1, le=MAX_PAGE, description=f"1-based page number, at most {MAX_PAGE}."),
]


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    total: int
    page: int
    page_size: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))

    @property
    def has_next(self) -> bool:
        return self.page < self.pages

    @property
    def has_previous(self) -> bool:
        return self.page > 1


def paginate(
    session: Session,
    query: Select[Any],
    *,
    order_by: Sequence[Any],
    page: int,
    page_size: int,
) -> Page[Any]:
    page = max(1, min(page, MAX_PAGE))
    page_size = max(1, min(page_size, MAX_PAGE_SIZE))
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
    items = list(
        session.scalars(query.order_by(*order_by).offset((page - 1) * page_size).limit(page_size))
    )
    return Page(items=items, total=total, page=page, page_size=page_size)
