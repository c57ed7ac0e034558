"""Domain errors raised by the service layer and mapped to HTTP answers at the edges."""

from __future__ import annotations


class DomainError(Exception):
    """Base class: a request that cannot be carried out as asked."""

    status_code = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFoundError(DomainError):
    status_code = 404


class ConflictError(DomainError):
    status_code = 409


class StaleRevisionError(ConflictError):
    """The caller edited an older revision than the one stored: someone else changed it."""

    def __init__(self, *, expected: int, actual: int) -> None:
        super().__init__(
            f"revision {expected} is stale: the stored revision is {actual}; "
            "reload, re-apply your change and try again",
            field="revision",
        )
        self.expected = expected
        self.actual = actual


class InvalidError(DomainError):
    """Input that is well-formed but not acceptable, with every problem found (not just the
    first), each tied to the field it is about: ``spec.routes[0].backends[1].version``."""

    status_code = 422

    def __init__(self, issues: list[tuple[str, str]]) -> None:
        first_field = issues[0][0]
        message = "; ".join(f"{field}: {text}" if field else text for field, text in issues)
        super().__init__(message, field=first_field or None)
        self.issues = issues
