"""runner memory: each heartbeat records its workers' device memory

`runners.memory` is a JSON object, per worker: bytes in use and in all (a CUDA device's allocated,
reserved and total memory; the runner process's resident memory for a CPU worker), as of the
runner's last heartbeat. Runners registered before record none.

Revision ID: 0012
Revises: 0011
"""
from alembic import op
import sqlalchemy as sa


revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runners", sa.Column("memory", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("runners", "memory")
