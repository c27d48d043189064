"""step recoveries: a step taken back after its runner died keeps its attempt

A crash is not the step's failure. Each time a step is taken back from a runner that is gone (or
whose lease expired) its `recoveries` count grows; `[runner] max_attempts` bounds attempts less
recoveries, and `[runner] max_recoveries` bounds recoveries. Steps recorded before count none.

Revision ID: 0011
Revises: 0010
"""
from alembic import op
import sqlalchemy as sa


revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("steps", sa.Column("recoveries", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("steps", "recoveries")
