"""What the audit log is verified against: the signing key, the checkpoint file, the
checkpointer that feeds it, and the cached verified prefix behind the console's badge. One per
process (``app.state.audit_trust``; ``meshctl`` builds its own)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.audit.checkpoints import (
    Checkpoint,
    Checkpointer,
    CheckpointFile,
    CheckpointSigner,
    TrustedCheckpoints,
)
from app.audit.service import ChainVerification, VerifiedPrefix, verify_chain
from app.config import Settings
from app.db import Database

__all__ = ["AuditTrust", "AuditTrustDep", "build_audit_trust"]


@dataclass
class AuditTrust:
    signer: CheckpointSigner
    file: CheckpointFile
    checkpoints: TrustedCheckpoints
    checkpointer: Checkpointer
    prefix: VerifiedPrefix

    def verify(self, session: Session, *, incremental: bool = False) -> ChainVerification:
        """The chain, checked against every signed checkpoint of the file.

        ``incremental`` reads only the events added since the last call (the console's badge);
        otherwise every event is read.
        """
        report = self.checkpoints.load(session)
        if incremental:
            result = self.prefix.verify(session, anchors=report.anchors)
        else:
            result = verify_chain(session, anchors=report.anchors)
        if report.problem is not None and result.ok:
            return replace(result, ok=False, detail=report.problem)
        return result

    def verify_and_checkpoint(
        self, session: Session
    ) -> tuple[ChainVerification, Checkpoint | None]:
        """A full check and, if the chain is sound, a checkpoint of its head: the operator has
        just looked at it, so it is the moment to sign it. A broken chain is never signed."""
        result = self.verify(session)
        if not result.ok:
            return result, None
        return result, self.checkpointer.checkpoint()


def build_audit_trust(settings: Settings, database: Database) -> AuditTrust:
    signer = CheckpointSigner.load_or_create(settings.effective_audit_key_file)
    file = CheckpointFile(settings.effective_audit_checkpoint_file)
    return AuditTrust(
        signer=signer,
        file=file,
        checkpoints=TrustedCheckpoints(file, signer.public_key),
        checkpointer=Checkpointer(
            database,
            signer,
            file,
            every=settings.audit_checkpoint_every,
            interval=settings.audit_checkpoint_seconds,
        ),
        prefix=VerifiedPrefix(),
    )


def get_audit_trust(request: Request) -> AuditTrust:
    trust: AuditTrust = request.app.state.audit_trust
    return trust


AuditTrustDep = Annotated[AuditTrust, Depends(get_audit_trust)]
