"""Signed checkpoints of the audit chain's head, kept where a database writer cannot reach.

The hash chain alone proves only that the events hang together: whoever can write the table
can rewrite an event and re-hash everything after it, or cut events off the end, and the
chain still checks out. A checkpoint is the head (seq, hash) and the time, signed with an
Ed25519 key that lives in a file outside the database, and appended to a file outside the
database (``audit-checkpoints.jsonl``) as well as to the ``audit_checkpoints`` table.
Verification trusts the file: the chain must contain every event a checkpoint in it vouches
for, with the hash it vouches for.

One signature per checkpoint, not per event: the checkpointer signs the committed head after
every ``MESH_AUDIT_CHECKPOINT_EVERY`` events this process wrote, at most
``MESH_AUDIT_CHECKPOINT_SECONDS`` after an unsigned event, at shutdown, and on
``meshctl audit verify`` / ``meshctl audit checkpoint``. Events written after the newest
checkpoint are covered by the chain only; that window is what the two settings bound.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from app.audit.models import AuditCheckpoint, AuditEvent
from app.audit.service import EVENTS_RECORDED, Anchor
from app.db import Database, utcnow
from app.keys import load_or_create_key_file

__all__ = [
    "Checkpoint",
    "CheckpointFile",
    "CheckpointSigner",
    "Checkpointer",
    "TrustedCheckpoints",
    "load_public_key",
    "public_key_pem",
]

logger = logging.getLogger(__name__)

_SIGNED_PREFIX = b"mesh-audit-checkpoint-v1\n"


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    time: datetime
    key_id: str
    signature: str

    def message(self) -> bytes:
        return signed_message(self.seq, self.hash, self.time)

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "hash": self.hash,
            "time": self.time.isoformat(timespec="microseconds"),
            "key_id": self.key_id,
            "signature": self.signature,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        seq, digest = data["seq"], data["hash"]
        if not isinstance(seq, int) or not isinstance(digest, str) or len(digest) != 64:
            raise ValueError("seq must be an integer and hash 64 hex digits")
        return cls(
            seq=seq,
            hash=digest,
            time=datetime.fromisoformat(data["time"]),
            key_id=str(data["key_id"]),
            signature=str(data["signature"]),
        )

    def anchor(self) -> Anchor:
        when = self.time.strftime("%Y-%m-%d %H:%M:%S UTC")
        return Anchor(self.seq, self.hash, f"the checkpoint signed {when}")


def signed_message(seq: int, digest: str, when: datetime) -> bytes:
    body = json.dumps(
        {"seq": seq, "hash": digest, "time": when.isoformat(timespec="microseconds")},
        sort_keys=True,
        separators=(",", ":"),
    )
    return _SIGNED_PREFIX + body.encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def signature_valid(checkpoint: Checkpoint, public_key: Ed25519PublicKey) -> bool:
    try:
        public_key.verify(
            base64.b64decode(checkpoint.signature, validate=True), checkpoint.message()
        )
    except (InvalidSignature, ValueError):
        return False
    return True


class CheckpointSigner:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    @classmethod
    def load_or_create(cls, path: Path) -> CheckpointSigner:
        """The key in ``path``, generated (0600) on first use; its public half is written
        beside it as ``<name>.pub`` for whoever verifies exports elsewhere."""

        def generate() -> bytes:
            return Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )

        private = serialization.load_pem_private_key(
            load_or_create_key_file(path, generate), password=None
        )
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        signer = cls(private)
        public_path = path.with_name(path.name.removesuffix(".key") + ".pub")
        if not public_path.exists():
            public_path.write_text(public_key_pem(signer.public_key))
        return signer

    def sign(self, seq: int, digest: str, when: datetime) -> Checkpoint:
        signature = self._private_key.sign(signed_message(seq, digest, when))
        return Checkpoint(seq, digest, when, self.key_id, base64.b64encode(signature).decode())


class CheckpointFileError(ValueError):
    pass


class CheckpointFile:
    """The append-only JSON-lines file of checkpoints."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, checkpoint: Checkpoint) -> None:
        line = json.dumps(checkpoint.as_json(), sort_keys=True, separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, line.encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def read_from(self, offset: int) -> tuple[list[tuple[int, Checkpoint]], int]:
        """Complete lines after byte ``offset`` as (line number hint, checkpoint), and the new
        offset. A final line without its newline (a write in progress) is left for later."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return [], offset
        complete = data[: data.rfind(b"\n") + 1]
        found: list[tuple[int, Checkpoint]] = []
        for number, raw in enumerate(complete.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                found.append((number, Checkpoint.from_json(json.loads(raw))))
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointFileError(
                    f"{self.path}: an unreadable line after byte {offset}: {exc}"
                ) from exc
        return found, offset + len(complete)

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


@dataclass(frozen=True)
class TrustReport:
    anchors: list[Anchor]
    problem: str | None


class TrustedCheckpoints:
    """The checkpoints of the file whose signatures check out, read incrementally: the file is
    append-only, so each call parses and verifies only the lines added since the last one."""

    def __init__(self, file: CheckpointFile, public_key: Ed25519PublicKey) -> None:
        self.file = file
        self.public_key = public_key
        self._lock = threading.Lock()
        self._offset = 0
        self._anchors: list[Anchor] = []

    def load(self, session: Session | None = None) -> TrustReport:
        with self._lock:
            if self.file.size() < self._offset:
                self._offset, self._anchors = 0, []
                return TrustReport([], f"{self.file.path} shrank: checkpoints were removed")
            try:
                found, offset = self.file.read_from(self._offset)
            except CheckpointFileError as exc:
                return TrustReport(list(self._anchors), str(exc))
            for _, checkpoint in found:
                if not signature_valid(checkpoint, self.public_key):
                    return TrustReport(
                        list(self._anchors),
                        f"{self.file.path} holds a checkpoint for event {checkpoint.seq} whose "
                        "signature does not verify with this control plane's key",
                    )
            self._anchors.extend(checkpoint.anchor() for _, checkpoint in found)
            self._offset = offset
            anchors = list(self._anchors)
        if not anchors and session is not None:
            in_database = session.scalar(select(func.count()).select_from(AuditCheckpoint))
            if in_database:
                return TrustReport(
                    anchors,
                    f"the checkpoint file {self.file.path} is missing or empty, but the "
                    f"database lists {in_database} checkpoints: events cut off the end of the "
                    "log would go unnoticed; restore the file from a backup",
                )
        return TrustReport(anchors, None)


class Checkpointer:
    """Signs the committed chain head when enough events or time have gone by."""

    def __init__(
        self,
        database: Database,
        signer: CheckpointSigner,
        file: CheckpointFile,
        *,
        every: int = 100,
        interval: float = 60.0,
    ) -> None:
        self.database = database
        self.signer = signer
        self.file = file
        self.every = every
        self.interval = interval
        self._lock = threading.Lock()
        self._pending = 0
        self._signed_seq: int | None = None
        self._attached = False

    @property
    def pending(self) -> int:
        """Events this process committed since its last checkpoint."""
        return self._pending

    def attach(self) -> None:
        """Count events as the database's sessions commit them."""
        if self._attached:
            return
        self._attached = True
        for factory in (self.database.write_sessions, self.database.read_sessions):
            event.listen(factory, "after_commit", self._after_commit)
            event.listen(factory, "after_rollback", self._after_rollback)

    def detach(self) -> None:
        if not self._attached:
            return
        self._attached = False
        for factory in (self.database.write_sessions, self.database.read_sessions):
            event.remove(factory, "after_commit", self._after_commit)
            event.remove(factory, "after_rollback", self._after_rollback)

    def _after_commit(self, session: Session) -> None:
        recorded = session.info.pop(EVENTS_RECORDED, 0)
        if not recorded:
            return
        with self._lock:
            self._pending += recorded
            due = self._pending >= self.every
        if due:
            self.checkpoint_quietly()

    def _after_rollback(self, session: Session) -> None:
        session.info.pop(EVENTS_RECORDED, None)

    def checkpoint_quietly(self) -> Checkpoint | None:
        # Runs after a change has committed: failing here must not turn that change into an
        # error for its author. The next checkpoint retries.
        try:
            return self.checkpoint()
        except Exception:
            logger.exception("could not write an audit checkpoint; will retry")
            return None

    def checkpoint(self) -> Checkpoint | None:
        """Sign the committed head unless it is signed already; None if there was nothing."""
        with self._lock:
            with self.database.session(write=False) as session:
                head = session.execute(
                    select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
                ).first()
            if self._signed_seq is None:
                # From the file, not the table: a row planted in the table with a huge seq
                # must not stop this process from ever signing again.
                found, _ = self.file.read_from(0)
                self._signed_seq = max((checkpoint.seq for _, checkpoint in found), default=0)
            if head is None or self._signed_seq >= head.seq:
                self._pending = 0
                return None
            checkpoint = self.signer.sign(head.seq, head.hash, utcnow())
            # The file first: it is the copy verification trusts, and the head is committed,
            # so a checkpoint in the file without its database copy is still true.
            self.file.append(checkpoint)
            with self.database.session(write=True) as session:
                session.add(
                    AuditCheckpoint(
                        seq=checkpoint.seq,
                        hash=checkpoint.hash,
                        signed_at=checkpoint.time,
                        key_id=checkpoint.key_id,
                        signature=checkpoint.signature,
                    )
                )
                session.commit()
            self._signed_seq = checkpoint.seq
            self._pending = 0
            return checkpoint

    async def run(self) -> None:
        """Sign pending events at least every ``interval`` seconds; cancel to stop."""
        while True:
            await asyncio.sleep(self.interval)
            if self._pending:
                await asyncio.to_thread(self.checkpoint_quietly)


def iter_database_checkpoints(session: Session) -> Iterator[Checkpoint]:
    for row in session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id)):
        yield Checkpoint(row.seq, row.hash, row.signed_at, row.key_id, row.signature)
