"""`meshctl`: run the console and operate the mesh from a terminal."""

from __future__ import annotations

import sys
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from app.config import Settings

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
    uvicorn.run(
        create_app(settings, database),
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


@audit_cli.command("verify")
def audit_verify() -> None:
    """Walk the audit hash chain and report the first broken link, if any."""
    from app.audit.service import verify_chain
    from app.db import Database

    settings = _load_settings()
    database = Database(settings.effective_database_url)
    try:
        with database.session(write=False) as session:
            result = verify_chain(session)
    except SQLAlchemyError as exc:
        _fail(f"cannot read the audit log: {exc}")
    finally:
        database.dispose()
    if result.ok:
        typer.echo(f"OK: {result.detail}")
        return
    typer.echo(f"BROKEN at event {result.first_broken_seq}: {result.detail}", err=True)
    typer.echo(f"({result.checked} events before it verified)", err=True)
    raise typer.Exit(1)


def main() -> None:
    sys.exit(cli())
