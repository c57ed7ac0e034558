"""Loading, validating, versioning and persisting the dynamic config.

Everything here is synchronous and side-effect free except :func:`save_last_good`, which writes
the state file atomically (temp file + fsync + ``os.replace``) so that a crash mid-write leaves
the previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mesh_agent.protocol import ConfigIssue, MeshConfig, config_version, consistency_errors

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


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _validation_issues(exc: ValidationError) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        # Drop pydantic's internal location parts (function-after[...] and the like).
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        msg = err["msg"].removeprefix("Value error, ")
        issues.append(ConfigIssue(path=_loc_to_path(loc), message=msg))
    return issues


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
        config = MeshConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_validation_issues(exc), source) from None
    issues = consistency_errors(config)
    if issues:
        raise ConfigError(issues, source)
    return LoadedConfig(config=config, version=config_version(config), source=source)


def parse_config(text: str | bytes, source: str = "") -> LoadedConfig:
    """Parse YAML (a superset of JSON) and validate it."""
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
            "config": loaded.config.model_dump(mode="json"),
        },
        indent=2,
        sort_keys=True,
    ).encode()
    fd, tmp = tempfile.mkstemp(prefix=".last-good-", suffix=".tmp", dir=directory)
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
