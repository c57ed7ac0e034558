"""`meshctl`: run the console and operate the mesh from a terminal."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from app.config import Settings
from app.errors import DomainError

if TYPE_CHECKING:
    from app.audit.service import ChainVerification
    from app.audit.trust import AuditTrust
    from app.db import Database

cli = typer.Typer(
    help="Control plane of the mesh: console, API and operator commands.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_cli = typer.Typer(help="Database schema commands.", no_args_is_help=True)
audit_cli = typer.Typer(help="Audit log commands.", no_args_is_help=True)
token_cli = typer.Typer(
    help="The mesh join token agents present, and API tokens.", no_args_is_help=True
)
user_cli = typer.Typer(help="People who may sign in to the console.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(user_cli, name="user")
cli.add_typer(audit_cli, name="audit")
cli.add_typer(token_cli, name="token")

ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="Control plane URL [MESH_SERVER; default http://MESH_HOST:MESH_PORT].",
        envvar="MESH_SERVER",
    ),
]


def _fail(message: str) -> NoReturn:
    typer.echo(f"meshctl: error: {message}", err=True)
    raise typer.Exit(2)


def _load_settings(**overrides: object) -> Settings:
    try:
        values = {key: value for key, value in overrides.items() if value is not None}
        return Settings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"MESH_{'_'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors()
        )
        _fail(f"invalid configuration: {problems}")


def _prepare_database(settings: Settings) -> None:
    """Create the data folder for the embedded default and migrate to the latest schema."""
    from app.db import make_engine
    from app.migrate import upgrade

    url = settings.effective_database_url
    if url.startswith("sqlite") and not settings.database_url:
        try:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _fail(f"cannot create data folder {settings.data_dir}: {exc.strerror}")
    engine = make_engine(url)
    try:
        upgrade(engine)
    except SQLAlchemyError as exc:
        original = getattr(exc, "orig", None) or exc
        reason = (str(original).strip().splitlines() or [exc.__class__.__name__])[0]
        _fail(f"cannot use database {_redact(url)}: {reason}")
    finally:
        engine.dispose()


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on [MESH_HOST].")] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port to listen on [MESH_PORT].")
    ] = None,
    migrate: Annotated[
        bool, typer.Option(help="Bring the database schema up to date first.")
    ] = True,
) -> None:
    """Run the console and JSON API."""
    import uvicorn

    from app.main import create_app

    settings = _load_settings(host=host, port=port)
    if migrate:
        _prepare_database(settings)
    if settings.host in ("0.0.0.0", "::") and not settings.allowed_hosts:
        typer.echo(
            "note: listening on all interfaces, but answering only to localhost names; "
            "set MESH_ALLOWED_HOSTS to the names people use to reach this console",
            err=True,
        )
    typer.echo(
        f"mesh console on http://{settings.host}:{settings.port}  "
        f"(database: {_redact(settings.effective_database_url)})",
        err=True,
    )
    if migrate:
        from app.db import Database

        database = Database(settings.effective_database_url)
        try:
            link = bootstrap_sign_in(settings, database)
        finally:
            database.dispose()
        if link:
            typer.echo(
                f"no one can sign in yet: {settings.initial_admin_email} (admin) was created; "
                f"open this one-time link within 30 minutes, then set a password:\n  {link}",
                err=True,
            )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        proxy_headers=False,
        server_header=False,
    )


@cli.command()
def demo(
    host: Annotated[str | None, typer.Option(help="Address to listen on [MESH_HOST].")] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port to listen on [MESH_PORT].")
    ] = None,
    rps: Annotated[
        float, typer.Option(min=0.1, max=200, help="Requests per second of demo traffic.")
    ] = 8.0,
) -> None:
    """A living mesh on this machine: the console, eight demo services each behind its own
    mesh-agent, and gentle traffic. Its own database (data/demo/), fresh on every run unless
    MESH_DATABASE_URL is set. Ctrl-C stops everything."""
    from app.demo.runner import DemoError, run_demo

    settings = _load_settings(host=host, port=port)
    try:
        code = run_demo(
            settings,
            rps=rps,
            echo=lambda text: typer.echo(text, err=True),
            prepare_database=_prepare_database,
        )
    except DemoError as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply all pending migrations."""
    settings = _load_settings()
    _prepare_database(settings)
    typer.echo("database schema is up to date")


@db_cli.command("current")
def db_current() -> None:
    """Show the schema revision of the database and the newest one available."""
    from app.db import make_engine
    from app.migrate import current_revision, head_revision

    settings = _load_settings()
    engine = make_engine(settings.effective_database_url)
    try:
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        _fail(f"cannot read database: {exc}")
    finally:
        engine.dispose()
    typer.echo(f"current: {current or '(empty database)'}\nhead:    {head_revision()}")


def _audit_trust(settings: Settings, database: Database) -> AuditTrust:
    from app.audit.trust import build_audit_trust
    from app.keys import KeyFileError

    try:
        return build_audit_trust(settings, database)
    except (KeyFileError, OSError, ValueError) as exc:
        _fail(f"cannot load the audit signing key: {exc}")


def _report(result: ChainVerification) -> None:
    if result.ok:
        typer.echo(f"OK: {result.detail}")
        return
    where = "" if result.first_broken_seq is None else f" at event {result.first_broken_seq}"
    typer.echo(f"BROKEN{where}: {result.detail}", err=True)
    typer.echo(f"({result.checked} events before it verified)", err=True)
    raise typer.Exit(1)


@audit_cli.command("verify")
def audit_verify(
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Verify this export (JSON lines) instead of the database."),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="PEM public key the export's checkpoints must be signed with "
            "(<data dir>/audit-signing.pub of the control plane that wrote it).",
        ),
    ] = None,
) -> None:
    """Walk the audit hash chain and check it against the signed checkpoints.

    Without --file, reads the database and, if the chain is sound, signs its head (a new
    checkpoint). With --file, checks an export offline; --public-key is then required.
    """
    if file is not None:
        _verify_export(file, public_key)
        return
    from app.db import Database

    settings = _load_settings()
    database = Database(settings.effective_database_url)
    try:
        trust = _audit_trust(settings, database)
        with database.session(write=False) as session:
            result, checkpoint = trust.verify_and_checkpoint(session)
    except SQLAlchemyError as exc:
        _fail(f"cannot read the audit log: {exc}")
    finally:
        database.dispose()
    _report(result)
    if checkpoint is not None:
        typer.echo(f"signed a checkpoint at event {checkpoint.seq}")


def _verify_export(file: Path, public_key: Path | None) -> None:
    from app.audit.checkpoints import load_public_key
    from app.audit.export import ExportFormatError, verify_export

    if public_key is None:
        _fail("--file needs --public-key: the key from the control plane that signed the log")
    try:
        key = load_public_key(public_key.read_bytes())
    except (OSError, ValueError) as exc:
        _fail(f"cannot read the public key {public_key}: {exc}")
    try:
        with file.open(encoding="utf-8") as lines:
            verification = verify_export(lines, key)
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror}")
    except (ExportFormatError, UnicodeDecodeError) as exc:
        _fail(f"{file} is not a mesh audit export: {exc}")
    if verification.result.ok and verification.checkpoints == 0:
        typer.echo("warning: the export holds no signed checkpoint", err=True)
    _report(verification.result)


@audit_cli.command("checkpoint")
def audit_checkpoint() -> None:
    """Verify the chain and sign its head now (refused if the chain is broken)."""
    from app.db import Database

    settings = _load_settings()
    database = Database(settings.effective_database_url)
    try:
        trust = _audit_trust(settings, database)
        with database.session(write=False) as session:
            result, checkpoint = trust.verify_and_checkpoint(session)
    except SQLAlchemyError as exc:
        _fail(f"cannot read the audit log: {exc}")
    finally:
        database.dispose()
    if not result.ok:
        _report(result)
    if checkpoint is None:
        typer.echo("nothing to sign: the head is already signed (or the log is empty)")
    else:
        typer.echo(f"signed a checkpoint at event {checkpoint.seq} ({checkpoint.hash[:16]}…)")


@audit_cli.command("export")
def audit_export(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Write the audit log and its signed checkpoints as JSON lines."""
    from app.audit.export import export_lines
    from app.db import Database

    settings = _load_settings()
    database = Database(settings.effective_database_url)
    try:
        trust = _audit_trust(settings, database)
        if output is None:
            for line in export_lines(database, trust):
                sys.stdout.write(line)
        else:
            # Written aside and renamed, so a failed export never leaves half a file behind.
            partial = output.with_name(output.name + ".partial")
            with partial.open("w", encoding="utf-8") as handle:
                handle.writelines(export_lines(database, trust))
            partial.replace(output)
            typer.echo(f"wrote {output}", err=True)
    except SQLAlchemyError as exc:
        _fail(f"cannot read the audit log: {exc}")
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror}")
    finally:
        database.dispose()


@audit_cli.command("public-key")
def audit_public_key() -> None:
    """Print the public key that verifies this control plane's checkpoints."""
    from app.audit.checkpoints import public_key_pem
    from app.db import Database

    settings = _load_settings()
    database = Database(settings.effective_database_url)
    try:
        typer.echo(public_key_pem(_audit_trust(settings, database).signer.public_key), nl=False)
    finally:
        database.dispose()


@token_cli.command("show")
def token_show() -> None:
    """Print the join token (created on first use), for mesh-agent --token."""
    from app.agents.token import JoinToken

    settings = _load_settings()
    try:
        typer.echo(JoinToken(settings.effective_join_token_file).ensure())
    except OSError as exc:
        _fail(f"cannot read or create {settings.effective_join_token_file}: {exc.strerror}")


@token_cli.command("rotate")
def token_rotate() -> None:
    """Replace the join token. Agents with the old one are refused from now on: restart them
    with the new token."""
    from app.agents.token import JoinToken

    settings = _load_settings()
    try:
        JoinToken(settings.effective_join_token_file).rotate()
    except OSError as exc:
        _fail(f"cannot write {settings.effective_join_token_file}: {exc.strerror}")
    typer.echo(f"join token replaced in {settings.effective_join_token_file}", err=True)


def _with_database(settings: Settings) -> Database:
    from app.db import Database

    _prepare_database(settings)
    return Database(settings.effective_database_url)


def _sign_in_url(settings: Settings, secret: str) -> str:
    return f"{settings.effective_public_url}/sign-in/link/{secret}"


@user_cli.command("create")
def user_create(
    email: Annotated[str, typer.Argument(help="The person's e-mail address (their sign-in name).")],
    admin: Annotated[bool, typer.Option("--admin", help="Same as --role admin.")] = False,
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
    team: Annotated[
        list[str] | None, typer.Option("--team", help="A team they belong to (repeatable).")
    ] = None,
) -> None:
    """Add a person and print a one-time sign-in link (valid 30 minutes); no password is set,
    they choose one under "Your account"."""
    from app.identity.accounts import create_user
    from app.identity.principal import Principal
    from app.identity.schemas import UserCreate
    from app.identity.sign_in import create_sign_in_link

    settings = _load_settings()
    try:
        data = UserCreate(email=email, role="admin" if admin else role, teams=team or [])
    except ValidationError as exc:
        _fail("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()))
    database = _with_database(settings)
    try:
        with database.session(write=True) as session:
            try:
                user = create_user(session, Principal.system("meshctl"), data)
            except DomainError as exc:
                _fail(exc.message)
            secret = create_sign_in_link(session, user)
            session.commit()
    finally:
        database.dispose()
    typer.echo(f"{data.email} added as {data.role}. One-time sign-in link (30 minutes):", err=True)
    typer.echo(_sign_in_url(settings, secret))


@user_cli.command("link")
def user_link(email: Annotated[str, typer.Argument(help="The person's e-mail address.")]) -> None:
    """Print a new one-time sign-in link for an existing person (a forgotten password)."""
    from app.identity.accounts import find_user
    from app.identity.sign_in import create_sign_in_link

    settings = _load_settings()
    database = _with_database(settings)
    try:
        with database.session(write=True) as session:
            user = find_user(session, email)
            if user is None:
                _fail(f"no user {email.strip().lower()}")
            secret = create_sign_in_link(session, user)
            session.commit()
    finally:
        database.dispose()
    typer.echo(_sign_in_url(settings, secret))


@token_cli.command("create")
def token_create(
    user: Annotated[str, typer.Option("--user", help="The person the token acts for.")],
    name: Annotated[str, typer.Option(help="What the token is for (e.g. ci-deploy).")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin (at most theirs).")] = (
        "viewer"
    ),
    team: Annotated[str | None, typer.Option(help="Narrow the token to one team.")] = None,
    days: Annotated[int, typer.Option(min=1, max=3650, help="Days until it expires.")] = 90,
    output: Annotated[
        Path | None, typer.Option(help="Write it to this file (created 0600) instead of stdout.")
    ] = None,
) -> None:
    """Create an API token for meshctl or automation and print it (this once). Use it as
    MESH_TOKEN, or in ~/.config/mesh/token with mode 0600."""
    from app.identity.accounts import find_user
    from app.identity.principal import Principal
    from app.identity.schemas import TokenCreate
    from app.identity.tokens import create_api_token

    settings = _load_settings()
    try:
        data = TokenCreate(name=name, role=role, team=team, expires_in_days=days)
    except ValidationError as exc:
        _fail("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()))
    database = _with_database(settings)
    try:
        with database.session(write=True) as session:
            owner = find_user(session, user)
            if owner is None:
                _fail(f"no user {user.strip().lower()}")
            try:
                created = create_api_token(session, Principal.system("meshctl"), data, owner=owner)
            except DomainError as exc:
                _fail(exc.message)
            session.commit()
    finally:
        database.dispose()
    if output is None:
        typer.echo(created.secret)
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.unlink(missing_ok=True)
        descriptor = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(created.secret + "\n")
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror}")
    typer.echo(f"token written to {output}", err=True)


def bootstrap_sign_in(settings: Settings, database: Database) -> str | None:
    """On an empty user table: an admin account and a one-time link to it, so the first
    person can get in without any default password existing."""
    from app.identity.accounts import count_users, create_user
    from app.identity.principal import Principal
    from app.identity.schemas import UserCreate
    from app.identity.sign_in import create_sign_in_link

    with database.session(write=True) as session:
        if count_users(session):
            return None
        user = create_user(
            session,
            Principal.system("meshctl"),
            UserCreate(email=settings.initial_admin_email, role="admin"),
        )
        secret = create_sign_in_link(session, user)
        session.commit()
    return _sign_in_url(settings, secret)


def _server_url(server: str | None) -> str:
    if server:
        return server.rstrip("/")
    settings = _load_settings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def _api(method: str, server: str | None, path: str, **kwargs: Any) -> Any:
    """Call the JSON API; any failure is one line on stderr and exit code 2."""
    import httpx

    from app.identity.cli_token import TokenFileError, auth_headers

    url = _server_url(server)
    try:
        headers = {**auth_headers(), **kwargs.pop("headers", {})}
    except TokenFileError as exc:
        _fail(str(exc))
    try:
        response = httpx.request(method, url + path, timeout=30.0, headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the control plane at {url}: {exc.__class__.__name__}: {exc}")
    if response.status_code >= 400:
        try:
            body = response.json()
            detail = body.get("detail", body)
        except ValueError:
            detail = response.text[:300]
        if isinstance(detail, list):  # FastAPI's own 422 shape
            detail = "; ".join(str(item.get("msg", item)) for item in detail)
        _fail(f"{response.status_code}: {detail}")
    return response.json() if response.content else None


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


@cli.command("proxy-status")
def proxy_status(
    server: ServerOption = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
    service: Annotated[str | None, typer.Option("--service")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
) -> None:
    """Every agent with its sync state (SYNCED, STALE, NACKED, NOT_SENT, DISCONNECTED)."""
    import json

    params = {k: v for k, v in {"namespace": namespace, "service": service}.items() if v}
    data = _api("GET", server, "/api/v1/agents", params=params)
    if output == "json":
        typer.echo(json.dumps(data, indent=2))
        return
    rows = [
        [
            f"{a['namespace']}/{a['service']}",
            a["version"],
            a["address"] or "-",
            a["sync_state"],
            a["config_version"] or "-",
            a["last_seen_at"][:19].replace("T", " "),
            (a["last_error"] or "")[:60],
        ]
        for a in data["items"]
    ]
    typer.echo(
        _table(
            ["SERVICE", "VERSION", "ADDRESS", "SYNC", "CONFIG", "LAST SEEN (UTC)", "ERROR"], rows
        )
    )
    summary = ", ".join(f"{n} {state}" for state, n in data["counts"].items() if n)
    typer.echo(f"\n{data['total']} agent(s){': ' + summary if summary else ''}")


def _parse_weights(text: str) -> dict[str, int]:
    weights: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        version, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise typer.BadParameter(f"{item!r}: write VERSION=PERCENT, e.g. v1=90,v2=10")
        weights[version.strip()] = int(value)
    if not weights:
        raise typer.BadParameter("give at least one VERSION=PERCENT")
    return weights


@cli.command()
def canary(
    service: Annotated[str, typer.Argument(help="The service whose traffic to shift.")],
    weights: Annotated[
        str, typer.Option("--weights", help="VERSION=PERCENT,… summing to 100, e.g. v1=90,v2=10")
    ],
    reason: Annotated[str, typer.Option("--reason", help="Why; stored in the audit log.")],
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
    server: ServerOption = None,
    wait: Annotated[
        bool, typer.Option(help="Wait until every agent applied it (or refused it).")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for convergence.")] = 60.0,
) -> None:
    """Shift traffic between versions of SERVICE and follow the change to every agent."""
    import time

    split = _parse_weights(weights)
    data = _api(
        "POST",
        server,
        f"/api/v1/services/{service}/traffic/weights",
        params={"namespace": namespace},
        json={"weights": split},
        headers={"X-Mesh-Reason": reason},
    )
    change = data.get("change")
    shown = ", ".join(f"{v}={w}" for v, w in split.items())
    if change is None:
        typer.echo(f"{namespace}/{service}: already at {shown}; nothing to push")
        return
    typer.echo(
        f"{namespace}/{service}: {shown} (revision {data['revision']}, change {change['id']})"
    )
    deadline = time.monotonic() + timeout
    while wait and change["state"] == "pending" and time.monotonic() < deadline:
        time.sleep(0.2)
        change = _api("GET", server, f"/api/v1/changes/{change['id']}")
    typer.echo(_change_line(change))
    if change["state"] == "partial":
        for error in change["errors"]:
            typer.echo(f"  NACKED by {error['agent_id']}: {error['error']}", err=True)
        raise typer.Exit(1)


def _change_line(change: dict[str, Any]) -> str:
    state, targeted, synced = change["state"], change["targeted"], change["synced"]
    if state == "idle":
        return "no agent needed this change (none calls the service yet)"
    took = f" in {change['duration_ms']} ms" if change["duration_ms"] is not None else ""
    if state == "converged":
        return f"{synced}/{targeted} agents synced{took}"
    nacked = f", {change['nacked']} NACKED" if change["nacked"] else ""
    return f"{synced}/{targeted} agents synced{nacked}{took} ({state})"


def main() -> None:
    sys.exit(cli())


import app.operator  # noqa: E402, F401  (registers get, export and apply on cli)
