"""How an attempt to get a response can fail, as the proxy's parts tell each other."""

from __future__ import annotations

from typing import Final

__all__ = ["FAILURE_REASON", "ClientGone", "Failure"]


class Failure(Exception):
    """An attempt that produced no usable response. ``kind``: connect-failure, reset, timeout,
    overflow."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class ClientGone(Exception):
    pass


# The x-mesh-error reason of each Failure kind.
FAILURE_REASON: Final = {
    "connect-failure": "connect-failure",
    "reset": "upstream-reset",
    "timeout": "upstream-timeout",
    "overflow": "overflow",
}
