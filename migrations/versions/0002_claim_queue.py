"""claim queue: sessions.ready and ready_at with their index

A claim used to sort every pending step on each call; now the reducer keeps, per session, whether
its current step may be claimed and from when, and one index scan finds the next step.

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa


revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CURRENT_STEP = "steps.session_id = sessions.session_id AND steps.step_index = sessions.current_step"


def upgrade() -> None:
    # Plain ADD COLUMN (no table copy): the views over sessions stay as they are.
    op.add_column("sessions", sa.Column("ready", sa.Integer(), server_default="0", nullable=False))
    op.add_column("sessions", sa.Column("ready_at", sa.Float(), nullable=True))
    op.drop_index("ix_sessions_claim", table_name="sessions")
    op.create_index("ix_sessions_ready", "sessions", ["ready", sa.literal_column("priority DESC"), "created_event"])
    op.create_index("ix_sessions_status", "sessions", ["status"])
    # Fill the queue for sessions that exist already, as the reducer would.
    op.execute(
        "UPDATE sessions SET ready = 1, "
        f"ready_at = COALESCE((SELECT not_before FROM steps WHERE {CURRENT_STEP}), 0.0) "
        "WHERE status IN ('pending', 'running') "
        f"AND EXISTS (SELECT 1 FROM steps WHERE {CURRENT_STEP} AND steps.status = 'pending')"
    )


def downgrade() -> None:
    op.drop_index("ix_sessions_status", table_name="sessions")
    op.drop_index("ix_sessions_ready", table_name="sessions")
    op.create_index("ix_sessions_claim", "sessions", ["status", "priority", "created_event"])
    op.drop_column("sessions", "ready_at")
    op.drop_column("sessions", "ready")
