"""owners: who each job is for, their place in the fair share, and the owner_status view

`sessions.owner` and `batches.owner` ("default" for what was made before). `owner_shares` holds
each owner's finish tag in the fair share (operational, like leases). `session_status` gains the
owner. `owner_status`: per owner, sessions running and pending (paused and held included),
images made today and GPU-seconds today (UTC; a shared call's time split by its images).

Revision ID: 0014
Revises: 0013
"""
from alembic import op
import sqlalchemy as sa


revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

WEIGHT = ("CASE st.domain WHEN 'inference' THEN 20 WHEN 'postprocessing' THEN 4 WHEN 'model' THEN 2 "
          "ELSE 1 END")
PROGRESS = f"""CASE WHEN s.total_steps = 0 OR s.status = 'completed' THEN 1.0
                    ELSE COALESCE((SELECT (SUM(CASE WHEN st.step_index < s.current_step THEN {WEIGHT} ELSE 0 END)
                                           + COALESCE(l.progress, 0.0)
                                             * SUM(CASE WHEN st.step_index = s.current_step THEN {WEIGHT} ELSE 0 END))
                                          * 1.0 / SUM({WEIGHT})
                                   FROM steps st WHERE st.session_id = s.session_id), 0.0) END"""


def session_status(with_owner: bool) -> str:
    return f"""
        SELECT s.session_id, s.job_id, s.workflow_id, s.status, s.current_step, s.total_steps,
               {PROGRESS} AS progress,
               s.priority, s.created_at, s.started_at, s.updated_at, s.finished_at,
               s.error_code, s.error_message{', s.owner' if with_owner else ''}
        FROM sessions s
        LEFT JOIN leases l ON l.session_id = s.session_id AND l.step_index = s.current_step
    """


def owner_status(dialect: str) -> str:
    if dialect == "sqlite":
        today = "strftime('%Y-%m-%d 00:00:00', 'now')"
        images = "COALESCE(json_array_length(st.output, '$.images'), 0)"
        share = "COALESCE(json_extract(st.output, '$.data.call_images'), 0)"
    else:
        today = "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ' 00:00:00'"
        images = "COALESCE(json_array_length((st.output::json) -> 'images'), 0)"
        share = "COALESCE(((st.output::json) -> 'data' ->> 'call_images')::integer, 0)"
    return f"""
        SELECT o.owner,
               (SELECT count(*) FROM sessions s WHERE s.owner = o.owner AND s.status = 'running') AS running,
               (SELECT count(*) FROM sessions s WHERE s.owner = o.owner AND s.status IN ('pending', 'paused'))
                   AS pending,
               (SELECT COALESCE(SUM({images}), 0) FROM steps st JOIN sessions s ON s.session_id = st.session_id
                 WHERE s.owner = o.owner AND st.domain = 'inference' AND st.status = 'completed'
                   AND st.finished_at >= {today}) AS images_today,
               (SELECT COALESCE(SUM(CASE WHEN {share} > 0 THEN st.duration_s * {images} / {share}
                                         ELSE st.duration_s END), 0.0)
                  FROM steps st JOIN sessions s ON s.session_id = st.session_id
                 WHERE s.owner = o.owner AND st.domain = 'inference' AND st.status = 'completed'
                   AND st.finished_at >= {today}) AS gpu_seconds_today
        FROM (SELECT DISTINCT owner FROM sessions) o
    """


def upgrade() -> None:
    op.add_column("sessions", sa.Column("owner", sa.String(length=64), nullable=False, server_default="default"))
    op.add_column("batches", sa.Column("owner", sa.String(length=64), nullable=False, server_default="default"))
    op.create_index("ix_sessions_owner_ready", "sessions", ["ready", "priority", "owner", "created_event"])
    op.create_index("ix_sessions_owner_status", "sessions", ["owner", "status"])
    op.create_index("ix_sessions_created_event", "sessions", ["created_event"])
    op.create_table("owner_shares", sa.Column("owner", sa.String(length=64), nullable=False),
                    sa.Column("finish", sa.Float(), nullable=False), sa.PrimaryKeyConstraint("owner"))
    op.execute("DROP VIEW IF EXISTS session_status")
    op.execute(f"CREATE VIEW session_status AS {session_status(True)}")
    op.execute(f"CREATE VIEW owner_status AS {owner_status(op.get_bind().dialect.name)}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS owner_status")
    op.execute("DROP VIEW IF EXISTS session_status")
    op.execute(f"CREATE VIEW session_status AS {session_status(False)}")
    op.drop_table("owner_shares")
    op.drop_index("ix_sessions_created_event", table_name="sessions")
    op.drop_index("ix_sessions_owner_status", table_name="sessions")
    op.drop_index("ix_sessions_owner_ready", table_name="sessions")
    op.drop_column("batches", "owner")
    op.drop_column("sessions", "owner")
