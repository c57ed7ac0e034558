"""Shared fixtures. Every control-plane test that uses a database runs twice: on SQLite and
on PostgreSQL. PostgreSQL is required in CI (CI=true or MESH_TEST_REQUIRE_POSTGRES=1): there a
missing server fails the run instead of skipping."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Database, make_engine
from app.migrate import upgrade

POSTGRES_ADMIN_URL = os.environ.get(
    "MESH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
POSTGRES_REQUIRED = bool(os.environ.get("CI")) or os.environ.get(
    "MESH_TEST_REQUIRE_POSTGRES", ""
) not in ("", "0")


def postgres_unavailable_reason() -> str | None:
    try:
        engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return f"PostgreSQL at {POSTGRES_ADMIN_URL} unreachable: {exc.__class__.__name__}"
    return None


def require_postgres() -> None:
    reason = postgres_unavailable_reason()
    if reason is None:
        return
    if POSTGRES_REQUIRED:
        pytest.fail(reason + " (required in CI)")
    pytest.skip(reason)


class PostgresDatabases:
    """Creates throw-away databases on the test server and drops them at the end."""

    def __init__(self) -> None:
        self.admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.created: list[str] = []

    def create(self) -> str:
        name = f"mesh_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.admin.connect() as connection:
            for name in self.created:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[PostgresDatabases]:
    require_postgres()
    databases = PostgresDatabases()
    yield databases
    databases.drop_all()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file; each test gets a copy (much faster than migrating anew)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def postgres_template_url(postgres_databases: PostgresDatabases) -> str:
    url = postgres_databases.create()
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


def _tables_to_clear() -> list[str]:
    """Every table the models declare, so a new domain's tables are reset without listing them."""
    import app.models  # noqa: F401  (registers every model on the metadata)
    from app.db import Base

    return [table.name for table in reversed(Base.metadata.sorted_tables)]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty, fully migrated database of each kind."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        target = tmp_path / "mesh.db"
        shutil.copyfile(template, target)
        return f"sqlite:///{target}"
    url: str = request.getfixturevalue("postgres_template_url")
    engine = make_engine(url)
    tables = _tables_to_clear()
    with engine.begin() as connection:
        # The audit tables refuse TRUNCATE (a statement trigger); a test reset is the one
        # legitimate truncation, so it switches user triggers off for its own transaction.
        for table in tables:
            connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
        connection.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY"))
        # Tamper tests switch the append-only guards off too; every test starts with them on.
        for table in tables:
            connection.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))
    engine.dispose()
    return url


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    yield database
    database.dispose()


@pytest.fixture
def session(database: Database) -> Iterator[Session]:
    """A write session; the test decides when to commit."""
    with database.session(write=True) as session:
        yield session


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    # TestClient sends "Host: testserver"; a real browser would use one of the default names.
    return Settings(data_dir=tmp_path, database_url=db_url, allowed_hosts=["testserver"])


@pytest.fixture
def client(settings: Settings, database: Database) -> Iterator[TestClient]:
    """A browser that opened the console: it holds the CSRF cookie, sends the page's token (as
    ``static/app.js`` does for htmx requests) and says where it comes from (a same-origin
    Referer), so the Host, Origin and CSRF checks let it through. Tests of those checks use
    ``bare_client``."""
    from app.main import create_app

    with TestClient(create_app(settings, database)) as test_client:
        page = test_client.get("/services").text
        match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
        assert match, "the console's pages carry no CSRF token"
        test_client.headers["X-CSRF-Token"] = match.group(1)
        test_client.headers["Referer"] = "http://testserver/services"
        yield test_client


@pytest.fixture
def bare_client(settings: Settings, database: Database) -> Iterator[TestClient]:
    """A client with no cookie and no Origin, Referer or token: curl, meshctl, an agent."""
    from app.main import create_app

    with TestClient(create_app(settings, database)) as test_client:
        yield test_client
