"""Settings read from the environment (prefix ``MESH_``), validated once at start-up."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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

    join_token_file: Path | None = None
    """The mesh join token agents present; empty means ``<data dir>/join-token``."""
    poll_hold_s: float = Field(default=30.0, gt=0, le=300)
    """How long the control plane holds an agent's discovery poll open when nothing changed."""
    agent_disconnect_s: float = Field(default=15.0, gt=0)
    """An agent without an open poll for this long is DISCONNECTED."""
    agent_grace_s: float = Field(default=60.0, ge=0)
    """A DISCONNECTED agent's endpoint leaves its callers' config after this long."""
    change_deadline_s: float = Field(default=60.0, gt=0)
    """A change not ACKed by every targeted agent after this long is reported as partial."""
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
    otlp_require_token: bool = True
    """False: accept telemetry without the join token (e.g. behind a collector that checks it)."""
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
    health_degraded_error_pct: float = Field(default=0.1, ge=0, le=100)
    """Topology and catalog health: a service or edge whose error rate (% of requests that
    failed) is above this is degraded ..."""
    health_failing_error_pct: float = Field(default=20.0, ge=0, le=100)
    """... and above this, failing (Kiali's defaults)."""
    allowed_hosts: Annotated[list[str], NoDecode] = []
    """Host names (optionally ``name:port``; ``*.example.com`` for sub-domains; ``*`` for any)
    the console answers to. Empty means the listen address plus the loopback names. A request
    for any other Host gets 400: DNS rebinding cannot reach the console."""

    secret_key_file: Path | None = None
    """Key that signs browser cookies (CSRF tokens). Default ``<data dir>/secret.key``,
    generated at first start with 0600 permissions; never a built-in default."""

    audit_key_file: Path | None = None
    """Ed25519 key that signs audit checkpoints. Default ``<data dir>/audit-signing.key``."""
    audit_checkpoint_file: Path | None = None
    """Append-only copy of every signed checkpoint. Default
    ``<data dir>/audit-checkpoints.jsonl``."""
    audit_checkpoint_every: int = Field(default=100, ge=1)
    """Sign the chain head after this many new events written by this process ..."""
    audit_checkpoint_seconds: float = Field(default=60.0, gt=0)
    """... or after this many seconds, whichever comes first (and at shutdown)."""

    # Sign-in and sessions
    session_idle_minutes: float = Field(default=8 * 60, gt=0)
    """A console session unused for this long ends ..."""
    session_absolute_hours: float = Field(default=7 * 24, gt=0)
    """... and every session ends this long after sign-in, however busy."""
    sign_in_max_failures: int = Field(default=5, ge=1)
    """Wrong passwords in a row that lock an account ..."""
    sign_in_lockout_minutes: float = Field(default=15, gt=0)
    """... for this long."""
    initial_admin_email: str = "admin@mesh.local"
    """The admin account ``meshctl serve`` creates when no one can sign in yet."""
    public_url: str = ""
    """How people reach the console (for printed sign-in links and the OIDC redirect);
    empty means ``http://<host>:<port>``."""
    oidc_issuer: str = ""
    """OpenID Connect single sign-on: the provider's issuer URL (empty: off)."""
    oidc_client_id: str = ""
    oidc_client_secret: str = ""
    oidc_scopes: str = "openid email profile"
    oidc_teams_claim: str = "groups"
    """The claim listing a person's teams (group names become team names)."""
    oidc_role_claim: str = ""
    """A claim holding "viewer", "operator" or "admin"; empty: use the group lists below."""
    oidc_admin_groups: Annotated[list[str], NoDecode] = []
    oidc_operator_groups: Annotated[list[str], NoDecode] = []
    """Members of these groups get that role; everyone else who signs in is a viewer."""

    @field_validator("database_url")
    @classmethod
    def _only_known_databases(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("MESH_DATABASE_URL must be an sqlite:// or postgresql:// URL")
        return value

    @field_validator("allowed_hosts", "oidc_admin_groups", "oidc_operator_groups", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        from app.middleware import split_host

        for host in value:
            if host != "*" and split_host(host) is None:
                raise ValueError(f"{host!r} is not a host name[:port] (no scheme, no path)")
        return [host.lower() for host in value]

    @property
    def effective_allowed_hosts(self) -> list[str]:
        if self.allowed_hosts:
            return list(self.allowed_hosts)
        listen = self.host.lower()
        if ":" in listen and not listen.startswith("["):
            listen = f"[{listen}]"  # an IPv6 listen address appears bracketed in Host
        defaults = ["localhost", "127.0.0.1", "[::1]"]
        # 0.0.0.0 and :: are no one's Host: people reach such a server by a name, which
        # they must list in MESH_ALLOWED_HOSTS.
        if listen not in ("0.0.0.0", "[::]"):
            defaults.insert(0, listen)
        return list(dict.fromkeys(defaults))

    @property
    def effective_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def effective_secret_key_file(self) -> Path:
        return self.secret_key_file or self.data_dir / "secret.key"

    @property
    def effective_audit_key_file(self) -> Path:
        return self.audit_key_file or self.data_dir / "audit-signing.key"

    @property
    def effective_audit_checkpoint_file(self) -> Path:
        return self.audit_checkpoint_file or self.data_dir / "audit-checkpoints.jsonl"

    @property
    def effective_join_token_file(self) -> Path:
        return self.join_token_file or self.data_dir / "join-token"

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
