"""batch metrics: pipeline calls, images, call time and memory peak per batch, in batch_status

The seeds' BatchMetrics, kept by the reducer from the completions of a batch's items (each
inference completion names the call it came from), and shown by the batch_status view:
total_batches (calls made plus those the items left need at the rate so far), completed_batches
(calls made), total_images_generated, average_batch_time (seconds a call), memory_usage_peak
(bytes), estimated_time_remaining (seconds) and images_per_second.

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa


revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

OLD_VIEW = """
    SELECT b.batch_id, b.job_id, b.status, b.total_items, b.completed_items, b.failed_items,
           CASE WHEN b.total_items = 0 THEN 1.0
                ELSE (b.completed_items + b.failed_items + b.cancelled_items) * 1.0 / b.total_items
           END AS progress,
           b.created_at, b.updated_at, b.finished_at
    FROM batches b
"""

NEW_VIEW = """
    SELECT b.batch_id, b.job_id, b.status, b.total_items, b.completed_items, b.failed_items,
           CASE WHEN b.total_items = 0 THEN 1.0
                ELSE (b.completed_items + b.failed_items + b.cancelled_items) * 1.0 / b.total_items
           END AS progress,
           b.created_at, b.updated_at, b.finished_at,
           b.total_calls + CASE WHEN b.completed_items > 0
                                THEN ((b.total_items - b.completed_items - b.failed_items - b.cancelled_items)
                                      * b.total_calls + b.completed_items - 1) / b.completed_items
                                ELSE 0 END AS total_batches,
           b.total_calls AS completed_batches,
           b.total_images AS total_images_generated,
           CASE WHEN b.total_calls > 0 THEN b.call_seconds / b.total_calls END AS average_batch_time,
           b.memory_peak AS memory_usage_peak,
           CASE WHEN b.completed_items > 0
                THEN (b.total_items - b.completed_items - b.failed_items - b.cancelled_items)
                     * b.call_seconds / b.completed_items END AS estimated_time_remaining,
           CASE WHEN b.call_seconds > 0 THEN b.total_images / b.call_seconds END AS images_per_second
    FROM batches b
"""


def upgrade() -> None:
    op.add_column("batches", sa.Column("total_calls", sa.Integer(), server_default="0", nullable=False))
    op.add_column("batches", sa.Column("total_images", sa.Integer(), server_default="0", nullable=False))
    op.add_column("batches", sa.Column("call_seconds", sa.Float(), server_default="0", nullable=False))
    op.add_column("batches", sa.Column("memory_peak", sa.BigInteger(), nullable=True))
    op.add_column("batches", sa.Column("last_call_id", sa.String(length=32), nullable=True))
    op.execute("DROP VIEW IF EXISTS batch_status")
    op.execute(f"CREATE VIEW batch_status AS {NEW_VIEW}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS batch_status")
    op.execute(f"CREATE VIEW batch_status AS {OLD_VIEW}")
    for column in ("last_call_id", "memory_peak", "call_seconds", "total_images", "total_calls"):
        op.drop_column("batches", column)
