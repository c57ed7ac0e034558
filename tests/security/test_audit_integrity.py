"""The audit log against someone who can write to its database: forging and re-hashing,
cutting events off the end, deleting, REPLACE and TRUNCATE are each refused or detected."""

from __future__ import annotations

import asyncio
import json
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.audit.checkpoints import CheckpointSigner, load_public_key
from app.audit.export import verify_export
from app.audit.models import AuditCheckpoint
from app.audit.service import verify_chain
from app.audit.trust import AuditTrust, build_audit_trust
from app.catalog import service as catalog
from app.catalog.schemas import ServiceCreate
from app.config import Settings
from app.db import Database, utcnow
from app.main import create_app
from tests.conftest import ADMIN_EMAIL, api_token, person
from tests.security.tamper import forge_and_rehash, guards_off

ACTOR = person("alice@example.com")


@pytest.fixture
def trust(settings: Settings, database: Database) -> AuditTrust:
    return build_audit_trust(settings, database)


def write_events(database: Database, count: int, *, prefix: str = "svc") -> None:
    with database.session(write=True) as session:
        for index in range(count):
            catalog.create_service(
                session, ACTOR, data=ServiceCreate(name=f"{prefix}-{index}", owner_team="t")
            )
        session.commit()


def verify(trust: AuditTrust, database: Database) -> tuple[bool, int | None, str]:
    with database.session(write=False) as session:
        result = trust.verify(session)
    return result.ok, result.first_broken_seq, result.detail


def test_forge_and_rehash_fools_the_bare_chain_but_not_the_checkpoint(
    trust: AuditTrust, database: Database
) -> None:
    write_events(database, 4)
    assert trust.checkpointer.checkpoint() is not None
    forge_and_rehash(database, 2)

    with database.session(write=False) as session:
        assert verify_chain(session).ok  # the attack of the issue: the links still check out
    ok, broken, detail = verify(trust, database)
    assert not ok
    assert broken == 4
    assert "re-hashed" in detail


def test_forgery_between_two_checkpoints_is_located_after_the_older_one(
    trust: AuditTrust, database: Database
) -> None:
    write_events(database, 2, prefix="a")
    trust.checkpointer.checkpoint()
    write_events(database, 2, prefix="b")
    trust.checkpointer.checkpoint()
    forge_and_rehash(database, 3)
    ok, broken, detail = verify(trust, database)
    assert (ok, broken) == (False, 4)
    assert "after event 2" in detail


def test_events_cut_off_the_end_are_detected(trust: AuditTrust, database: Database) -> None:
    write_events(database, 3)
    trust.checkpointer.checkpoint()
    with guards_off(database) as connection:
        connection.execute(text("DELETE FROM audit_events WHERE seq = 3"))
    ok, broken, detail = verify(trust, database)
    assert (ok, broken) == (False, 3)
    assert "cut off the end" in detail


def test_a_deleted_event_is_detected(trust: AuditTrust, database: Database) -> None:
    write_events(database, 3)
    trust.checkpointer.checkpoint()
    with guards_off(database) as connection:
        connection.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    ok, broken, detail = verify(trust, database)
    assert (ok, broken) == (False, 3)
    assert "missing" in detail


def test_replace_over_an_existing_event_is_refused(session: Session) -> None:
    catalog.create_service(session, ACTOR, data=ServiceCreate(name="a", owner_team="t"))
    session.commit()
    columns = (
        "id, seq, occurred_at, actor, action, resource_kind, resource_name, before, after, "
        "reason, prev_hash, hash"
    )
    forged = columns.replace(" actor,", " 'mallory',")
    if session.get_bind().dialect.name == "sqlite":
        statement = f"INSERT OR REPLACE INTO audit_events ({columns}) SELECT {forged} "
        statement += "FROM audit_events WHERE seq = 1"
    else:  # PostgreSQL's REPLACE: an upsert, which is an UPDATE
        statement = f"INSERT INTO audit_events ({columns}) SELECT {forged} FROM audit_events "
        statement += "WHERE seq = 1 ON CONFLICT (seq) DO UPDATE SET actor = EXCLUDED.actor"
    with pytest.raises(DBAPIError, match="append-only"):
        session.execute(text(statement))
    session.rollback()
    assert session.scalar(text("SELECT actor FROM audit_events WHERE seq = 1")) == ACTOR.actor


@pytest.mark.parametrize("table", ["audit_events", "audit_checkpoints"])
def test_truncate_is_refused(
    session: Session, trust: AuditTrust, database: Database, table: str
) -> None:
    write_events(database, 1)
    trust.checkpointer.checkpoint()
    # SQLite has no TRUNCATE; its equivalent is an unqualified DELETE.
    dialect = session.get_bind().dialect.name
    statement = f"TRUNCATE {table}" if dialect == "postgresql" else f"DELETE FROM {table}"
    with pytest.raises(DBAPIError, match="append-only"):
        session.execute(text(statement))
    session.rollback()
    assert session.scalar(text(f"SELECT count(*) FROM {table}")) == 1


def test_checkpoints_are_append_only(
    session: Session, trust: AuditTrust, database: Database
) -> None:
    write_events(database, 1)
    trust.checkpointer.checkpoint()
    for statement in ("UPDATE audit_checkpoints SET seq = 99", "DELETE FROM audit_checkpoints"):
        with pytest.raises(DBAPIError, match="append-only"):
            session.execute(text(statement))
        session.rollback()


def test_keys_and_checkpoint_file_live_outside_the_database_privately(
    trust: AuditTrust, settings: Settings, database: Database
) -> None:
    write_events(database, 2)
    checkpoint = trust.checkpointer.checkpoint()
    assert checkpoint is not None and checkpoint.seq == 2
    key = settings.effective_audit_key_file
    assert key.parent == settings.data_dir
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    lines = settings.effective_audit_checkpoint_file.read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [2]
    assert stat.S_IMODE(settings.effective_audit_checkpoint_file.stat().st_mode) == 0o600
    # Nothing new, nothing signed: one checkpoint per head.
    assert trust.checkpointer.checkpoint() is None
    with database.session(write=False) as session:
        assert session.scalar(select(func.count()).select_from(AuditCheckpoint)) == 1


def test_a_checkpoint_is_signed_every_n_events_and_at_shutdown(
    settings: Settings, database: Database
) -> None:
    every_two = settings.model_copy(update={"audit_checkpoint_every": 2})
    with TestClient(create_app(every_two, database)) as client:
        client.headers["Authorization"] = f"Bearer {api_token(database, ADMIN_EMAIL)}"
        for index in range(5):
            response = client.post(
                "/api/v1/services", json={"name": f"s{index}", "owner_team": "t"}
            )
            assert response.status_code == 201
        signed = every_two.effective_audit_checkpoint_file.read_text().splitlines()
        assert [json.loads(line)["seq"] for line in signed] == [2, 4]
        assert client.get("/api/v1/audit/verify").json()["signed_up_to"] == 4
    signed = every_two.effective_audit_checkpoint_file.read_text().splitlines()
    assert [json.loads(line)["seq"] for line in signed] == [2, 4, 5]


def test_pending_events_are_signed_after_the_interval(
    trust: AuditTrust, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = trust.checkpointer
    checkpointer.interval = 0.01
    checkpointer.attach()
    try:
        write_events(database, 1)
        assert checkpointer.pending == 1

        async def until_signed() -> None:
            loop = asyncio.get_running_loop()
            signed = asyncio.Event()
            sign = checkpointer.checkpoint_quietly

            def sign_and_tell() -> object:
                result = sign()
                loop.call_soon_threadsafe(signed.set)
                return result

            monkeypatch.setattr(checkpointer, "checkpoint_quietly", sign_and_tell)
            task = asyncio.create_task(checkpointer.run())
            try:
                await asyncio.wait_for(signed.wait(), timeout=30)
            finally:
                task.cancel()

        # A loop of its own in another thread: a session fixture (Playwright's sync API) may
        # already run one in this thread.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(asyncio.run, until_signed()).result(timeout=60)
    finally:
        checkpointer.detach()
    assert checkpointer.pending == 0
    assert trust.file.read_from(0)[0][0][1].seq == 1


def test_a_checkpoint_signed_with_another_key_is_refused(
    trust: AuditTrust, database: Database
) -> None:
    write_events(database, 2)
    trust.checkpointer.checkpoint()
    impostor = CheckpointSigner(Ed25519PrivateKey.generate())
    trust.file.append(impostor.sign(2, "f" * 64, trust.file.read_from(0)[0][0][1].time))
    ok, _, detail = verify(trust, database)
    assert not ok
    assert "signature does not verify" in detail


def test_a_shrunk_or_missing_checkpoint_file_is_reported(
    settings: Settings, database: Database
) -> None:
    trust = build_audit_trust(settings, database)
    write_events(database, 2)
    trust.checkpointer.checkpoint()
    assert verify(trust, database)[0]
    trust.file.path.write_text("")
    ok, _, detail = verify(trust, database)
    assert not ok and "shrank" in detail
    # A fresh process (no memory of the file) sees it empty while the database has copies.
    ok, _, detail = verify(build_audit_trust(settings, database), database)
    assert not ok and "missing or empty" in detail


def test_export_verifies_offline_and_shows_tampering(
    client: TestClient, settings: Settings, database: Database
) -> None:
    for index in range(3):
        client.post("/api/v1/services", json={"name": f"s{index}", "owner_team": "t"})
    client.app.state.audit_trust.checkpointer.checkpoint()  # type: ignore[attr-defined]
    response = client.get("/api/v1/audit/export")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert "attachment" in response.headers["content-disposition"]
    lines = response.text.splitlines()
    kinds = [json.loads(line)["type"] for line in lines]
    assert kinds == ["header", "checkpoint", "event", "event", "event"]
    public_key = load_public_key(
        settings.effective_audit_key_file.with_name("audit-signing.pub").read_bytes()
    )

    good = verify_export(lines, public_key)
    assert good.result.ok and good.checkpoints == 1 and good.result.checked == 3

    truncated = verify_export(lines[:-1], public_key)
    assert not truncated.result.ok and "cut off the end" in truncated.result.detail

    edited = [json.loads(line) for line in lines]
    edited[3]["actor"] = "mallory"
    tampered = verify_export([json.dumps(item) for item in edited], public_key)
    assert not tampered.result.ok and tampered.result.first_broken_seq == 2

    other_key = Ed25519PrivateKey.generate().public_key()
    foreign = verify_export(lines, other_key)
    assert not foreign.result.ok and "not signed by the given public key" in foreign.result.detail


def test_a_checkpoint_row_planted_in_the_table_does_not_stop_signing(
    trust: AuditTrust, database: Database
) -> None:
    with database.session(write=True) as session:
        session.add(
            AuditCheckpoint(
                seq=999, hash="f" * 64, signed_at=utcnow(), key_id="x", signature="forged"
            )
        )
        session.commit()
    write_events(database, 2)
    checkpoint = trust.checkpointer.checkpoint()
    assert checkpoint is not None and checkpoint.seq == 2
    assert verify(trust, database)[0]


def test_a_later_checkpoint_of_a_regrown_head_does_not_hide_the_earlier_one(
    trust: AuditTrust, database: Database
) -> None:
    """Cut the last event off, let a new one take its seq, get that signed too: the first
    checkpoint of that seq still disagrees."""
    write_events(database, 3)
    trust.checkpointer.checkpoint()
    with guards_off(database) as connection:
        connection.execute(text("DELETE FROM audit_events WHERE seq = 3"))
    write_events(database, 1, prefix="regrown")
    with database.session(write=False) as session:
        new_head = session.scalar(text("SELECT hash FROM audit_events WHERE seq = 3"))
    trust.file.append(trust.signer.sign(3, new_head, utcnow()))
    ok, broken, detail = verify(trust, database)
    assert (ok, broken) == (False, 3)
    assert "re-hashed" in detail
