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
from typing import Any

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


ADMIN_EMAIL = "admin@example.com"


def person(email: str, role: str = "admin", teams: tuple[str, ...] = ()) -> Any:
    """A principal for tests that call the service layer directly (an admin unless told)."""
    from app.identity.principal import Principal, Role

    return Principal(
        kind="user", id=None, name=email, role=Role.parse(role), teams=frozenset(teams)
    )


def _quiet_user(session: Session, email: str, role: str, teams: tuple[str, ...]) -> Any:
    """The user ``email``, inserted directly if new: test set-up, so it leaves no audit event
    (tests count the events their own actions write)."""
    from app.identity.accounts import find_user
    from app.identity.models import Team, TeamMember, User

    user = find_user(session, email)
    if user is not None:
        return user
    user = User(email=email, role=role, display_name="", disabled=False, failed_sign_ins=0)
    session.add(user)
    session.flush()
    for name in teams:
        team = session.query(Team).filter_by(name=name).one_or_none()
        if team is None:
            team = Team(name=name)
            session.add(team)
            session.flush()
        session.add(TeamMember(user_id=user.id, team_id=team.id))
    session.flush()
    return user


def sign_in_as(
    test_client: TestClient,
    database: Database,
    email: str,
    *,
    role: str = "admin",
    teams: tuple[str, ...] = (),
) -> None:
    """Sign ``test_client`` in as ``email`` (created with ``role`` and ``teams`` if new),
    through a one-time sign-in link as a person would."""
    from app.identity.sign_in import create_sign_in_link

    with database.session(write=True) as session:
        user = _quiet_user(session, email, role, teams)
        secret = create_sign_in_link(session, user)
        session.commit()
    answer = test_client.get(f"/sign-in/link/{secret}", follow_redirects=False)
    assert answer.status_code == 303, answer.text


def api_token(
    database: Database, email: str, *, role: str = "admin", teams: tuple[str, ...] = ()
) -> str:
    """An API token acting for ``email`` (created with ``role`` and ``teams`` if new); set-up,
    so written directly, without an audit event."""
    import secrets

    from app.identity.common import digest
    from app.identity.models import ApiToken
    from app.identity.tokens import API_TOKEN_PREFIX

    secret = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    with database.session(write=True) as session:
        user = _quiet_user(session, email, role, teams)
        session.add(
            ApiToken(
                kind="api",
                name="tests",
                token_hash=digest(secret),
                prefix=secret[:11],
                owner_id=user.id,
                role=role,
                created_by="tests",
            )
        )
        session.commit()
    return secret


@pytest.fixture
def client(settings: Settings, database: Database) -> Iterator[TestClient]:
    """A browser signed in as an admin that opened the console: it holds the session and CSRF
    cookies, sends the page's token (as ``static/app.js`` does for htmx requests) and says
    where it comes from (a same-origin Referer), so the Host, Origin and CSRF checks let it
    through. Tests of those checks use ``bare_client``."""
    from app.main import create_app

    with TestClient(create_app(settings, database)) as test_client:
        sign_in_as(test_client, database, ADMIN_EMAIL)
        page = test_client.get("/services").text
        match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
        assert match, "the console's pages carry no CSRF token"
        test_client.headers["X-CSRF-Token"] = match.group(1)
        test_client.headers["Referer"] = "http://testserver/services"
        yield test_client


@pytest.fixture
def bare_client(settings: Settings, database: Database) -> Iterator[TestClient]:
    """A client with no cookie and no Origin, Referer or token: curl, an agent, a stranger."""
    from app.main import create_app

    with TestClient(create_app(settings, database)) as test_client:
        yield test_client


# Test files that start a whole demo mesh. Its ports are planned at random from one range below
# the kernel's ephemeral ports, so two demos planning at the same moment could pick the same
# port: under pytest-xdist they share one worker and run one after another.
DEMO_FILES = frozenset({"test_demo.py", "test_demo_faults.py", "test_demo_newcomer.py"})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups from the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test``, ``--dist loadgroup``) ordinary tests go one by one to
    whichever worker is free. Tests that start real processes or a browser keep their file on
    one worker, so a module's servers and agents start once, not once per worker."""
    for item in items:
        if item.get_closest_marker("e2e") is None and item.get_closest_marker("browser") is None:
            continue
        if item.path.name in DEMO_FILES:
            group = "demo"
        else:
            group = str(item.path.relative_to(config.rootpath))
        item.add_marker(pytest.mark.xdist_group(group))
