"""memory profiles: the per-image memory measured for a model, size and mode

Kept (as a projection of `model.measured` events) so that later calls, in this runner or another,
start from it: with a batch's dynamic_sizing, a call makes as many images as the memory a call
had then allows under the batch's memory_threshold, never more than max_batch_size.

Revision ID: 0007
Revises: 0006
"""
from alembic import op
import sqlalchemy as sa


revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "memory_profiles",
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(length=32), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=True),
        sa.Column("per_image_bytes", sa.BigInteger(), nullable=False),
        sa.Column("available_bytes", sa.BigInteger(), nullable=False),
        sa.Column("call_images", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("model_id", "width", "height", "mode"),
    )


def downgrade() -> None:
    op.drop_table("memory_profiles")
