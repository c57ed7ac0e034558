"""Loading, validating, versioning and persisting the dynamic config.

Everything here is synchronous and side-effect free except :func:`save_last_good`, which writes
the state file atomically (temp file + fsync + ``os.replace``) so that a crash mid-write leaves
the previous file intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh_agent.schema import (
    ConfigIssue,
    InvalidConfig,
    MeshConfig,
    config_version,
    consistency_errors,
    mesh_config,
    to_json,
)

__all__ = [
    "STATE_FILE",
    "ConfigError",
    "LoadedConfig",
    "load_file",
    "load_last_good",
    "parse_config",
    "save_last_good",
    "validate_config",
]

STATE_FILE = "last-good-config.json"


class ConfigError(Exception):
    """A config that must not be used; ``issues`` say precisely where and why."""

    def __init__(self, issues: list[ConfigIssue], source: str = "") -> None:
        self.issues = issues
        self.source = source
        super().__init__(self.detail())

    def detail(self) -> str:
        head = f"invalid config from {self.source}" if self.source else "invalid config"
        return head + ": " + "; ".join(str(i) for i in self.issues)


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    config: MeshConfig
    version: str
    source: str


def validate_config(data: Any, source: str = "") -> LoadedConfig:
    """Validate decoded data as a whole snapshot; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [
                ConfigIssue(
                    path="", message=f"top level must be a mapping, got {type(data).__name__}"
                )
            ],
            source,
        )
    try:
        config = mesh_config(data)
    except InvalidConfig as exc:
        raise ConfigError(exc.issues, source) from None
    issues = consistency_errors(config)
    if issues:
        raise ConfigError(issues, source)
    return LoadedConfig(config=config, version=config_version(config), source=source)


def parse_config(text: str | bytes, source: str = "") -> LoadedConfig:
    """Parse JSON or YAML and validate it.

    A document that is a JSON object is read as JSON, without loading PyYAML (~1.5 MB of RSS an
    agent fed by the control plane or a JSON file never needs); anything else, YAML.
    """
    if text.lstrip()[:1] in ("{", b"{"):
        try:
            data = json.loads(text)
        except ValueError:
            pass  # not JSON after all (a YAML flow mapping, say): YAML says what is wrong
        else:
            return validate_config(data, source)
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(path="", message=f"{where}{problem}")], source) from None
    return validate_config(data, source)


def load_file(path: str | os.PathLike[str]) -> LoadedConfig:
    source = f"file:{os.fspath(path)}"
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue(path="", message=f"cannot read: {exc.strerror or exc}")], source
        ) from None
    return parse_config(text, source)


def save_last_good(state_dir: str | os.PathLike[str], loaded: LoadedConfig) -> Path:
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / STATE_FILE
    payload = json.dumps(
        {
            "version": loaded.version,
            "source": loaded.source,
            "config": to_json(loaded.config),
        },
        indent=2,
        sort_keys=True,
    ).encode()
    # What tempfile.mkstemp does, without importing tempfile: it pulls in shutil, which loads
    # the bz2 and lzma libraries (~0.8 MB of RSS for a sidecar that never compresses anything).
    tmp = directory / f".last-good-{os.urandom(8).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def load_last_good(state_dir: str | os.PathLike[str]) -> LoadedConfig | None:
    """The persisted config, or None if there is none. A corrupt or invalid state file raises
    ConfigError (the caller decides whether that is fatal)."""
    target = Path(state_dir) / STATE_FILE
    source = f"state:{target}"
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError([ConfigIssue(path="", message=f"cannot read: {exc}")], source) from None
    try:
        doc = json.loads(raw)
        data = doc["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            [ConfigIssue(path="", message=f"corrupt state file: {exc}")], source
        ) from None
    return validate_config(data, source)
