"""Settings read from the environment (prefix ``MESH_``), validated once at start-up."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_data_dir() -> Path:
    return Path.cwd() / "data"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str = ""
    """SQLAlchemy URL. Empty means an SQLite file in ``data_dir``."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    """Requests with a larger body are refused with 413 before they are read."""

    sql_echo: bool = False

    # Telemetry ingest (OTLP/HTTP at /v1/traces and /v1/metrics)
    otlp_max_bytes: int = Field(default=8_388_608, ge=1024)
    """Largest OTLP body, compressed and again after gunzip: 413 above it."""
    otlp_rate_per_s: float = Field(default=50.0, gt=0)
    """OTLP requests per second one client (bearer token, else address) may send; 429 above."""
    otlp_burst: int = Field(default=200, ge=1)
    otlp_max_concurrent: int = Field(default=4, ge=1)
    """OTLP requests decoded and stored at once; the rest wait, so the console keeps its threads."""
    otlp_max_waiting: int = Field(default=64, ge=0)
    """OTLP requests allowed to wait for a slot; beyond it they get 503 with Retry-After."""
    otlp_worker_processes: int = Field(default=1, ge=0, le=32)
    """Processes that decode and store spans, so ingest never competes with the console for
    the interpreter lock; 0: threads of the console's own process."""
    otlp_store: bool = True
    """False: decode and validate OTLP requests but store nothing (benchmark peer, dry runs)."""
    span_attributes_max_bytes: int = Field(default=4096, ge=256)
    """Attributes stored per span, as JSON; the rest are dropped and the span is marked."""
    span_retention_hours: float = Field(default=72.0, gt=0)
    span_max_count: int = Field(default=1_000_000, ge=1000)
    rollup_10s_retention_hours: float = Field(default=1.25, gt=0)
    rollup_60s_retention_hours: float = Field(default=25.0, gt=0)
    rollup_600s_retention_hours: float = Field(default=7 * 24 + 1, gt=0)
    retention_interval_s: float = Field(default=30.0, gt=0)
    """How often the background pruner runs."""

    @field_validator("database_url")
    @classmethod
    def _only_known_databases(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("MESH_DATABASE_URL must be an sqlite:// or postgresql:// URL")
        return value

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return normalise_database_url(self.database_url)
        return f"sqlite:///{self.data_dir / 'mesh.db'}"


def normalise_database_url(url: str) -> str:
    """Let users write ``postgresql://`` and still get the psycopg 3 driver."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.removeprefix("postgres://")
    return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
