"""group claims: each step's compatibility key, and the ready session's, with its index

A runner claims several compatible steps at once (one pipeline call for many images): steps of a
kind that can be grouped carry a key (what must be equal for them to share a call), and the claim
queue finds a leader's partners by the ready session's current key in one index scan.

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("steps", sa.Column("group_key", sa.String(length=64), nullable=True))
    op.add_column("sessions", sa.Column("group_key", sa.String(length=64), nullable=True))
    op.create_index("ix_sessions_group", "sessions",
                    ["group_key", "ready", sa.literal_column("priority DESC"), "created_event"])
    op.create_index("ix_steps_group", "steps", ["group_key"])


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+), not a table copy: the views over these tables stay valid.
    op.drop_index("ix_steps_group", table_name="steps")
    op.drop_index("ix_sessions_group", table_name="sessions")
    op.drop_column("sessions", "group_key")
    op.drop_column("steps", "group_key")
