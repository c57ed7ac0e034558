"""Text fields that hold only visible text: one reusable check for every schema.

Refused everywhere: control characters (NUL included), lone surrogates, the bidirectional
overrides and isolates that make a name read differently from how it sorts and matches
(U+202A to U+202E, U+2066 to U+2069, "Trojan Source"), and zero-width characters that make two
different names look the same (U+200B to U+200D, U+2060, U+FEFF).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

__all__ = [
    "VISIBLE_LINE",
    "VISIBLE_LINES",
    "MultilineText",
    "PlainText",
    "text_problem",
    "unsafe_character",
]

_INVISIBLE = "\u200b-\u200d\u2060\ufeff\u202a-\u202e\u2066-\u2069\ud800-\udfff"
# C0 controls, DEL and C1 controls; multi-line text keeps tab, line feed and carriage return
# (browsers send a textarea's line breaks as CR LF).
_UNSAFE_LINE = re.compile(f"[\x00-\x1f\x7f-\x9f{_INVISIBLE}]")
_UNSAFE_MULTILINE = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f{_INVISIBLE}]")


def unsafe_character(value: str, *, multiline: bool = False) -> str | None:
    """A description of the first character that does not belong in text, or None."""
    found = (_UNSAFE_MULTILINE if multiline else _UNSAFE_LINE).search(value)
    if found is None:
        return None
    return f"U+{ord(found.group()):04X} at position {found.start() + 1}"


def text_problem(value: str, *, multiline: bool = False) -> str | None:
    """What is wrong with ``value`` as text, in words a form can show; None if nothing."""
    problem = unsafe_character(value, multiline=multiline)
    if problem is None:
        return None
    allowed = "line breaks and tabs" if multiline else "no line breaks"
    return (
        f"contains an invisible, control or direction-changing character ({problem}); "
        f"only visible text is allowed ({allowed})"
    )


def _check(value: str, *, multiline: bool) -> str:
    problem = text_problem(value, multiline=multiline)
    if problem is not None:
        raise ValueError(problem)
    return value


def _plain(value: str) -> str:
    return _check(value, multiline=False)


def _multiline(value: str) -> str:
    return _check(value, multiline=True)


VISIBLE_LINE = AfterValidator(_plain)
VISIBLE_LINES = AfterValidator(_multiline)
PlainText = Annotated[str, VISIBLE_LINE]
"""One line of visible text. With length limits, write
``Annotated[str, StringConstraints(...), VISIBLE_LINE]`` so that the limits are checked (and
reported) first."""
MultilineText = Annotated[str, VISIBLE_LINES]
"""Visible text that may span lines (descriptions)."""
