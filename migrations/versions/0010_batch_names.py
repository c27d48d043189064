"""batch names: a label a client gives a batch (the design notes' C# `Name`), kept and shown

A name is not an id: it may repeat and hold any text. Batches made before have none ("").

Revision ID: 0010
Revises: 0009
"""
from alembic import op
import sqlalchemy as sa


revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("name", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("batches", "name")
