"""`meshctl`: run the console and operate the mesh from a terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from app.config import Settings

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
cli.add_typer(db_cli, name="db")
cli.add_typer(audit_cli, name="audit")


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
) -> None:
    """Serve the console with a sample catalog (its own database, data/demo.db, unless
    MESH_DATABASE_URL is set)."""
    import uvicorn

    from app.db import Database, session_scope
    from app.demo import seed_demo_catalog
    from app.main import create_app

    settings = _load_settings(host=host, port=port)
    if not settings.database_url:
        settings = settings.model_copy(
            update={"database_url": f"sqlite:///{settings.data_dir / 'demo.db'}"}
        )
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    _prepare_database(settings)
    database = Database(settings.effective_database_url)
    for session in session_scope(database, write=True):
        created = seed_demo_catalog(session)
    typer.echo(
        f"demo catalog: {created} services created" if created else "demo catalog: already there",
        err=True,
    )
    typer.echo(f"mesh console on http://{settings.host}:{settings.port}", err=True)
    app = create_app(settings, database)
    # The seed's events were written before the app's checkpointer was listening.
    app.state.audit_trust.checkpointer.checkpoint_quietly()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        server_header=False,
    )


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


def main() -> None:
    sys.exit(cli())
