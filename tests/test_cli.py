"""meshctl: clear one-line refusals, schema commands and the audit chain check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from app.catalog import service as catalog
from app.catalog.schemas import ServiceCreate
from app.cli import cli
from app.db import Database
from tests.conftest import person

runner = CliRunner()


def env_for(db_url: str, tmp_path: Path) -> dict[str, str]:
    return {"MESH_DATABASE_URL": db_url, "MESH_DATA_DIR": str(tmp_path)}


def test_audit_verify_ok_and_broken(db_url: str, tmp_path: Path, database: Database) -> None:
    with database.session(write=True) as session:
        catalog.create_service(session, person("a"), data=ServiceCreate(name="one", owner_team="t"))
        catalog.create_service(session, person("a"), data=ServiceCreate(name="two", owner_team="t"))
        session.commit()

    ok = runner.invoke(cli, ["audit", "verify"], env=env_for(db_url, tmp_path))
    assert ok.exit_code == 0, ok.output
    assert "all 2 events verified" in ok.output

    with database.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
        else:
            connection.execute(text("DROP TRIGGER audit_events_no_update"))
        connection.execute(text("UPDATE audit_events SET reason = 'forged' WHERE seq = 1"))

    broken = runner.invoke(cli, ["audit", "verify"], env=env_for(db_url, tmp_path))
    assert broken.exit_code == 1
    assert "BROKEN at event 1" in broken.output


def test_db_upgrade_and_current(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = runner.invoke(cli, ["db", "upgrade"], env=env_for(url, tmp_path))
    assert result.exit_code == 0, result.output
    current = runner.invoke(cli, ["db", "current"], env=env_for(url, tmp_path))
    assert "(empty database)" not in current.output
    lines = dict(line.split(":", 1) for line in current.output.strip().splitlines())
    assert lines["current"].strip() == lines["head"].strip()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MESH_DATABASE_URL": "mysql://root@localhost/x"}, "MESH_DATABASE_URL"),
        ({"MESH_PORT": "70000"}, "MESH_PORT"),
        (
            {"MESH_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"},
            "cannot use database",
        ),
    ],
)
def test_serve_refuses_unusable_configuration_with_one_line(
    env: dict[str, str], message: str, tmp_path: Path
) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        env={**os.environ, "MESH_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert process.returncode == 2
    assert process.stderr.count("\n") == 1, process.stderr
    assert message in process.stderr
    assert "Traceback" not in process.stderr
