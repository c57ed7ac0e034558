"""Keys kept outside the database: created at first start, never a built-in default.

A database writer (a stolen backup restored elsewhere, an SQL injection, a careless admin) must
not be able to forge what these keys sign, so they live in files next to the data, readable by
the control plane's user only (0600), as SSH does with its private keys.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["KeyFileError", "load_or_create_key_file"]


class KeyFileError(RuntimeError):
    """A key file that exists but cannot be trusted or read."""


def load_or_create_key_file(path: Path, generate: Callable[[], bytes]) -> bytes:
    """The bytes stored in ``path``, creating the file with ``generate()`` if it is missing.

    Creation is atomic and exclusive (a temporary file linked into place), so two processes
    starting at once end up with the same key, and neither reads a half-written file.
    """
    try:
        return _read_private(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(generate())
            handle.flush()
            os.fsync(handle.fileno())
        # If another process won the race, its key is the one everyone uses.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return _read_private(path)


def _read_private(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    data = path.read_bytes()
    if not data.strip():
        raise KeyFileError(f"{path} is empty; delete it to have a new key generated")
    return data
