"""drop the index on steps.status

Running steps are found through their leases (every running step holds one), and whether work is
left through the claim queue; the index only cost a write on every step's change of status.

Revision ID: 0003
Revises: 0002
"""
from alembic import op


revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_steps_status", table_name="steps")


def downgrade() -> None:
    op.create_index("ix_steps_status", "steps", ["status"])
