"""spans without the redundant trace_id index

The unique (trace_id, span_id) index already serves every lookup by trace id (its leading
column); the second index on trace_id alone was one more random-order B-tree written for every
stored span, and spans are the table ingest writes most.

Revision ID: b8e41d07c5a2
Revises: 9b4e2f7c1a60
Create Date: 2026-11-29 05:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "b8e41d07c5a2"
down_revision: str | None = "9b4e2f7c1a60"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("spans", schema=None) as batch_op:
        batch_op.drop_index("ix_spans_trace_id")


def downgrade() -> None:
    with op.batch_alter_table("spans", schema=None) as batch_op:
        batch_op.create_index("ix_spans_trace_id", ["trace_id"], unique=False)
