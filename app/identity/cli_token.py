"""Where ``meshctl`` finds its API token: ``MESH_TOKEN``, else the file named by
``MESH_TOKEN_FILE`` (default ``~/.config/mesh/token``), which must be private to its owner."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["TokenFileError", "auth_headers", "load_cli_token"]


class TokenFileError(RuntimeError):
    pass


def _token_file() -> Path:
    configured = os.environ.get("MESH_TOKEN_FILE")
    if configured:
        return Path(configured).expanduser()
    return Path("~/.config/mesh/token").expanduser()


def load_cli_token() -> str | None:
    token = os.environ.get("MESH_TOKEN", "").strip()
    if token:
        return token
    path = _token_file()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TokenFileError(f"cannot read {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenFileError(
            f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    return path.read_text().strip() or None


def auth_headers() -> dict[str, str]:
    token = load_cli_token()
    return {"Authorization": f"Bearer {token}"} if token else {}
