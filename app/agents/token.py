"""The mesh join token: a shared secret every agent presents (``Authorization: Bearer …``).

Created at first start as a file readable by its owner only (like a k3s node token), never a
default value. ``meshctl token rotate`` replaces the file; a running control plane notices the
new file (it re-reads it when its modification time changes) and refuses the old token.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
import time
from pathlib import Path

__all__ = ["RECHECK_S", "JoinToken"]

RECHECK_S = 1.0


def _new_token() -> str:
    """A random token that never starts with "-": it is passed as ``--token <value>``, and
    argparse would take a leading dash for an option (1 token in 64 did)."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


class JoinToken:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._cached: tuple[tuple[int, int], str] | None = None
        self._checked_at = 0.0

    def ensure(self) -> str:
        """The token, created if there is none yet."""
        with self._lock:
            if not self.path.exists():
                self._write(_new_token())
            return self._read()

    def rotate(self) -> str:
        with self._lock:
            self._write(_new_token())
            return self._read()

    def check(self, presented: str) -> bool:
        try:
            with self._lock:
                expected = self._read()
        except OSError:
            return False
        return hmac.compare_digest(presented.encode(), expected.encode())

    def _read(self) -> str:
        # Every discovery poll and OTLP request checks the token: a stat() each time was a
        # visible share of ingest CPU. A rotation by another process (meshctl token rotate) is
        # noticed within RECHECK_S; one through this object at once.
        now = time.monotonic()
        if self._cached is not None and now - self._checked_at < RECHECK_S:
            return self._cached[1]
        # The inode too: a rotation writes a new file (os.replace), and file times come from a
        # coarse clock, so one within a few ms of the last write can keep the same mtime.
        status = self.path.stat()
        stamp = (status.st_mtime_ns, status.st_ino)
        if self._cached is None or self._cached[0] != stamp:
            self._cached = (stamp, self.path.read_text().strip())
        self._checked_at = now
        return self._cached[1]

    def _write(self, token: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        # Created 0600 from the start: never readable by others, not even for an instant.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(tmp, self.path)
        self._cached = None
