"""ingest identity on jobs; the runners table and its runner_status view

Each ingested file records what identifies that very file (name, inode, size, times, content), so
a crash between commit and move is told apart from a new file with the same name and bytes, and
several runners take each file once. A file that could not be moved out records why. Runners
register themselves, so one that died is noticed (on its host at once, elsewhere by its heartbeat).

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

NOW = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgresql": "extract(epoch from now())",
}


def upgrade() -> None:
    op.add_column("jobs", sa.Column("file_identity", sa.String(length=64), nullable=True))
    op.add_column("jobs", sa.Column("stored_as", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("move_error", sa.Text(), nullable=True))
    op.create_index("ix_jobs_identity", "jobs", ["file_identity"])
    op.create_index("ix_jobs_job_id", "jobs", ["job_id"])
    op.create_table(
        "runners",
        sa.Column("runner_id", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("process_started", sa.Float(), nullable=True),
        sa.Column("version", sa.String(length=32), nullable=True),
        sa.Column("devices", sa.Text(), nullable=True),
        sa.Column("warm_models", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.String(length=32), nullable=False),
        sa.Column("last_heartbeat", sa.String(length=32), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("runner_id"),
    )
    now = NOW.get(op.get_bind().dialect.name, NOW["postgresql"])
    op.execute(
        "CREATE VIEW runner_status AS SELECT runner_id, host, pid, devices, warm_models, "
        f"CASE WHEN status = 'running' AND expires_at < {now} THEN 'gone' ELSE status END AS status, "
        "last_heartbeat, version FROM runners"
    )


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS runner_status")
    op.drop_table("runners")
    op.drop_index("ix_jobs_job_id", table_name="jobs")
    op.drop_index("ix_jobs_identity", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("move_error")
        batch.drop_column("stored_as")
        batch.drop_column("file_identity")
