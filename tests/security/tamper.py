"""What an attacker with write access to the database does to the audit log, on each engine.

On SQLite the attacker uses their own connection (the sqlite3 module, the sqlite3 shell): it
has none of the control plane's connection settings, so INSERT OR REPLACE goes around the
append-only triggers. On PostgreSQL the attacker is the table owner or a superuser and
switches the triggers off.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, select, text

from app.audit.models import AuditEvent
from app.audit.service import GENESIS_HASH, HASHED_FIELDS, event_hash
from app.db import Database


def events(database: Database) -> list[dict[str, Any]]:
    with database.session(write=False) as session:
        rows = session.execute(select(AuditEvent.__table__).order_by(AuditEvent.seq)).all()
    return [dict(row._mapping) for row in rows]


def forge_and_rehash(database: Database, seq: int, *, actor: str = "mallory") -> None:
    """Change event ``seq``'s actor and re-hash it and everything after it: the chain still
    links up, so only something kept outside the database can tell."""
    stored = events(database)
    previous = stored[seq - 2]["hash"] if seq > 1 else GENESIS_HASH
    forged: list[dict[str, Any]] = []
    for row in stored[seq - 1 :]:
        if row["seq"] == seq:
            row["actor"] = actor
        row["prev_hash"] = previous
        row["hash"] = event_hash(**{name: row[name] for name in HASHED_FIELDS})
        previous = row["hash"]
        forged.append(row)
    if database.dialect == "sqlite":
        path = database.engine.url.database
        assert path
        connection = sqlite3.connect(path)
        for row in forged:
            connection.execute(
                "INSERT OR REPLACE INTO audit_events (id, seq, occurred_at, actor, actor_id, "
                "client_address, action, resource_kind, resource_name, before, after, reason, "
                "prev_hash, hash) "
                "SELECT id, seq, occurred_at, ?, actor_id, client_address, action, "
                "resource_kind, resource_name, before, after, reason, ?, ? "
                "FROM audit_events WHERE seq = ?",
                (row["actor"], row["prev_hash"], row["hash"], row["seq"]),
            )
        connection.commit()
        connection.close()
        return
    with guards_off(database) as connection:
        for row in forged:
            connection.execute(
                text(
                    "UPDATE audit_events SET actor = :a, prev_hash = :p, hash = :h WHERE seq = :s"
                ),
                {"a": row["actor"], "p": row["prev_hash"], "h": row["hash"], "s": row["seq"]},
            )


@contextmanager
def guards_off(database: Database) -> Iterator[Connection]:
    """A connection on which the append-only triggers do not fire, restored afterwards."""
    with database.engine.begin() as connection:
        if database.dialect == "postgresql":
            for table in ("audit_events", "audit_checkpoints"):
                connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
            yield connection
            for table in ("audit_events", "audit_checkpoints"):
                connection.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))
            return
        query = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"
        triggers = connection.execute(text(query)).all()
        for name, _ in triggers:
            connection.execute(text(f'DROP TRIGGER "{name}"'))
        yield connection
        for _, sql in triggers:
            connection.execute(text(sql))
