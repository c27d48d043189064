"""webhook deliveries: a job's notify, and each delivery of an event to a URL

`sessions.notify` and `batches.notify` hold a job's own webhook ({url, events}). `deliveries` is
a projection of the `delivery.*` events: one row per event reported to a URL (its id is the
webhook-id of every attempt), its status (pending, delivered, dead), attempts and next attempt.
The `webhook_deliveries` view is what operators read: id, event, url, attempts, last status, next
attempt.

Revision ID: 0013
Revises: 0012
"""
from alembic import op
import sqlalchemy as sa


revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

EventId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("sessions", sa.Column("notify", sa.Text(), nullable=True))
    op.add_column("batches", sa.Column("notify", sa.Text(), nullable=True))
    op.create_table(
        "deliveries",
        sa.Column("delivery_id", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=16), nullable=False),
        sa.Column("target_id", sa.String(length=128), nullable=False),
        sa.Column("event_id", EventId, nullable=False),
        sa.Column("event_type", sa.String(length=48), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("retry_base", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.Float(), nullable=True),
        sa.Column("created_at", sa.String(length=32), nullable=False),
        sa.Column("updated_at", sa.String(length=32), nullable=False),
        sa.Column("delivered_at", sa.String(length=32), nullable=True),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("delivery_id"),
    )
    op.create_index("ix_deliveries_due", "deliveries", ["status", "next_attempt_at"])
    op.execute(
        "CREATE VIEW webhook_deliveries AS SELECT delivery_id AS id, event_type AS event, event_id, "
        "target_type, target_id, url, status, attempts, last_status, last_error, next_attempt_at AS next_attempt, "
        "created_at, delivered_at FROM deliveries"
    )


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS webhook_deliveries")
    op.drop_index("ix_deliveries_due", table_name="deliveries")
    op.drop_table("deliveries")
    op.drop_column("batches", "notify")
    op.drop_column("sessions", "notify")
