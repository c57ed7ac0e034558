"""The audit log as JSON lines, to be kept elsewhere and verified offline.

Format ``mesh-audit-export/1``, one JSON object per line:

1. ``{"type": "header", "format": ..., "exported_at": ..., "key_id": ..., "public_key": PEM}``
2. every signed checkpoint (``"type": "checkpoint"``: seq, hash, time, key_id, signature),
   first, so that a verifier streaming the file knows what to expect before the events;
3. every event in seq order (``"type": "event"``: the hashed fields and ``hash``).

The public key in the header is a convenience, not a proof: whoever rewrote the file could
re-sign it with a key of their own. ``meshctl audit verify --file EXPORT --public-key KEY`` takes
the key from a copy kept apart (``<data dir>/audit-signing.pub``) and refuses a file signed
with another.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select

from app.audit.checkpoints import (
    Checkpoint,
    CheckpointFileError,
    iter_database_checkpoints,
    key_id,
    public_key_pem,
    signature_valid,
)
from app.audit.models import AuditEvent
from app.audit.service import HASHED_FIELDS, Anchor, ChainVerification, verify_rows
from app.audit.trust import AuditTrust
from app.db import Database, utcnow

__all__ = ["EXPORT_FORMAT", "export_lines", "verify_export"]

EXPORT_FORMAT = "mesh-audit-export/1"


def _line(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def export_lines(database: Database, trust: AuditTrust, *, batch_size: int = 1000) -> Iterator[str]:
    """The export, line by line, read in batches (the log may be far larger than memory)."""
    yield _line(
        {
            "type": "header",
            "format": EXPORT_FORMAT,
            "exported_at": utcnow().isoformat(timespec="microseconds"),
            "key_id": trust.signer.key_id,
            "public_key": public_key_pem(trust.signer.public_key),
        }
    )
    try:
        from_file = [checkpoint for _, checkpoint in trust.file.read_from(0)[0]]
    except CheckpointFileError:
        from_file = []
    with database.session(write=False) as session:
        checkpoints = from_file or list(iter_database_checkpoints(session))
        for checkpoint in checkpoints:
            yield _line({"type": "checkpoint", **checkpoint.as_json()})
        columns = [getattr(AuditEvent, name) for name in (*HASHED_FIELDS, "hash")]
        last_seq = 0
        while True:
            rows = session.execute(
                select(*columns)
                .where(AuditEvent.seq > last_seq)
                .order_by(AuditEvent.seq)
                .limit(batch_size)
            ).all()
            if not rows:
                break
            for row in rows:
                data = dict(row._mapping)
                data["occurred_at"] = row.occurred_at.isoformat(timespec="microseconds")
                yield _line({"type": "event", **data})
            last_seq = rows[-1].seq


@dataclass(frozen=True)
class ExportVerification:
    result: ChainVerification
    checkpoints: int


class ExportFormatError(ValueError):
    pass


def verify_export(lines: Iterable[str], public_key: Ed25519PublicKey) -> ExportVerification:
    """Check an export without the database: every checkpoint must be signed by
    ``public_key`` and the events must form a chain that contains what the checkpoints
    vouch for. Streams: memory does not grow with the number of events."""
    expected_key = key_id(public_key)
    anchors: list[Anchor] = []
    numbered = ((number, raw) for number, raw in enumerate(lines, start=1) if raw.strip())
    first_event: tuple[int, dict[str, Any]] | None = None
    for number, raw in numbered:
        kind, data = _parse(number, raw)
        if kind == "header":
            if data.get("format") != EXPORT_FORMAT:
                raise ExportFormatError(f"line {number}: unknown format {data.get('format')!r}")
        elif kind == "checkpoint":
            try:
                checkpoint = Checkpoint.from_json(data)
            except (ValueError, KeyError, TypeError) as exc:
                raise ExportFormatError(f"line {number}: a damaged checkpoint ({exc})") from exc
            if checkpoint.key_id != expected_key or not signature_valid(checkpoint, public_key):
                failure = ChainVerification(
                    False,
                    0,
                    checkpoint.seq,
                    f"line {number}: the checkpoint for event {checkpoint.seq} is not signed by "
                    "the given public key",
                )
                return ExportVerification(failure, len(anchors))
            anchors.append(checkpoint.anchor())
        elif kind == "event":
            first_event = (number, data)
            break
        else:
            raise ExportFormatError(f"line {number}: unknown line type {kind!r}")

    def events() -> Iterator[dict[str, Any]]:
        if first_event is None:
            return
        yield _event(*first_event)
        for number, raw in numbered:
            kind, data = _parse(number, raw)
            if kind != "event":
                raise ExportFormatError(f"line {number}: a {kind} line after the events")
            yield _event(number, data)

    return ExportVerification(verify_rows(events(), anchors=anchors), len(anchors))


def _parse(number: int, raw: str) -> tuple[str, dict[str, Any]]:
    try:
        data = json.loads(raw)
        kind = data.pop("type")
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ExportFormatError(f"line {number}: not an export line ({exc})") from exc
    return str(kind), data


def _event(number: int, data: dict[str, Any]) -> dict[str, Any]:
    missing = [name for name in (*HASHED_FIELDS, "hash") if name not in data]
    if missing:
        raise ExportFormatError(f"line {number}: event without {', '.join(missing)}")
    try:
        data["occurred_at"] = datetime.fromisoformat(data["occurred_at"])
    except (TypeError, ValueError) as exc:
        raise ExportFormatError(f"line {number}: a damaged event ({exc})") from exc
    return data
