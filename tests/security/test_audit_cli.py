"""meshctl audit: verify signs a sound head, checkpoint refuses a broken one, export and
offline verification of the export."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from app.audit.checkpoints import public_key_pem
from app.catalog import service as catalog
from app.catalog.schemas import ServiceCreate
from app.cli import cli
from app.db import Database
from tests.conftest import person
from tests.security.tamper import forge_and_rehash

runner = CliRunner()


def env_for(db_url: str, data_dir: Path) -> dict[str, str]:
    return {"MESH_DATABASE_URL": db_url, "MESH_DATA_DIR": str(data_dir)}


def seed(database: Database, count: int = 3) -> None:
    with database.session(write=True) as session:
        for index in range(count):
            catalog.create_service(
                session, person("a"), data=ServiceCreate(name=f"s{index}", owner_team="t")
            )
        session.commit()


def test_verify_signs_the_head_and_then_catches_a_forgery(
    db_url: str, tmp_path: Path, database: Database
) -> None:
    seed(database)
    env = env_for(db_url, tmp_path)
    first = runner.invoke(cli, ["audit", "verify"], env=env)
    assert first.exit_code == 0, first.output
    assert "all 3 events verified" in first.output
    assert "signed a checkpoint at event 3" in first.output
    assert (tmp_path / "audit-checkpoints.jsonl").exists()

    forge_and_rehash(database, 1)
    broken = runner.invoke(cli, ["audit", "verify"], env=env)
    assert broken.exit_code == 1
    assert "BROKEN at event 3" in broken.output and "re-hashed" in broken.output
    refused = runner.invoke(cli, ["audit", "checkpoint"], env=env)
    assert refused.exit_code == 1
    lines = (tmp_path / "audit-checkpoints.jsonl").read_text().splitlines()
    assert len(lines) == 1  # the forged head was not signed


def test_checkpoint_command(db_url: str, tmp_path: Path, database: Database) -> None:
    env = env_for(db_url, tmp_path)
    empty = runner.invoke(cli, ["audit", "checkpoint"], env=env)
    assert empty.exit_code == 0 and "nothing to sign" in empty.output
    seed(database, 2)
    signed = runner.invoke(cli, ["audit", "checkpoint"], env=env)
    assert signed.exit_code == 0 and "signed a checkpoint at event 2" in signed.output


def test_export_and_offline_verification(db_url: str, tmp_path: Path, database: Database) -> None:
    seed(database)
    env = env_for(db_url, tmp_path)
    assert runner.invoke(cli, ["audit", "checkpoint"], env=env).exit_code == 0
    export = tmp_path / "export.jsonl"
    written = runner.invoke(cli, ["audit", "export", "--output", str(export)], env=env)
    assert written.exit_code == 0, written.output
    public_key = tmp_path / "key.pub"
    printed = runner.invoke(cli, ["audit", "public-key"], env=env)
    public_key.write_text(printed.output)
    assert printed.output == (tmp_path / "audit-signing.pub").read_text()

    offline = ["audit", "verify", "--file", str(export), "--public-key", str(public_key)]
    ok = runner.invoke(cli, offline, env={})
    assert ok.exit_code == 0, ok.output
    assert "all 3 events verified; signed up to event 3" in ok.output

    lines = export.read_text().splitlines()
    export.write_text("\n".join(lines[:-1]) + "\n")  # the last event cut off
    cut = runner.invoke(cli, offline, env={})
    assert cut.exit_code == 1 and "cut off the end" in cut.output

    stranger = tmp_path / "stranger.pub"
    stranger.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    export.write_text("\n".join(lines) + "\n")
    foreign = runner.invoke(
        cli, ["audit", "verify", "--file", str(export), "--public-key", str(stranger)], env={}
    )
    assert foreign.exit_code == 1 and "not signed by the given public key" in foreign.output


def test_export_to_stdout_is_json_lines(db_url: str, tmp_path: Path, database: Database) -> None:
    seed(database, 1)
    result = runner.invoke(cli, ["audit", "export"], env=env_for(db_url, tmp_path))
    assert result.exit_code == 0
    kinds = [json.loads(line)["type"] for line in result.stdout.splitlines()]
    assert kinds == ["header", "event"]


def test_offline_verification_needs_a_key_and_a_readable_export(tmp_path: Path) -> None:
    export = tmp_path / "x.jsonl"
    export.write_text("not json\n")
    no_key = runner.invoke(cli, ["audit", "verify", "--file", str(export)], env={})
    assert no_key.exit_code == 2 and "--public-key" in no_key.output
    key = tmp_path / "k.pub"
    key.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    damaged = runner.invoke(
        cli, ["audit", "verify", "--file", str(export), "--public-key", str(key)], env={}
    )
    assert damaged.exit_code == 2 and "not a mesh audit export" in damaged.output
