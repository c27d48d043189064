"""weighted session progress: a denoising step counts for more than a device lookup

session_status.progress was (steps done + the running step's fraction) / steps, so a 1 ms device
step counted as much as a 30 s denoise. Each step now weighs by its domain (inference 20,
postprocessing 4, model 2, anything else 1): progress = (weight of the steps before the current one
+ the current step's weight x its fraction) / the session's total weight.

Revision ID: 0008
Revises: 0007
"""
from alembic import op


revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

WEIGHT = ("CASE st.domain WHEN 'inference' THEN 20 WHEN 'postprocessing' THEN 4 WHEN 'model' THEN 2 "
          "ELSE 1 END")

COLUMNS = """s.session_id, s.job_id, s.workflow_id, s.status, s.current_step, s.total_steps,
               {progress} AS progress,
               s.priority, s.created_at, s.started_at, s.updated_at, s.finished_at,
               s.error_code, s.error_message"""

OLD_PROGRESS = """CASE WHEN s.total_steps = 0 OR s.status = 'completed' THEN 1.0
                    ELSE (s.current_step + COALESCE(l.progress, 0.0)) * 1.0 / s.total_steps END"""

NEW_PROGRESS = f"""CASE WHEN s.total_steps = 0 OR s.status = 'completed' THEN 1.0
                    ELSE COALESCE((SELECT (SUM(CASE WHEN st.step_index < s.current_step THEN {WEIGHT} ELSE 0 END)
                                           + COALESCE(l.progress, 0.0)
                                             * SUM(CASE WHEN st.step_index = s.current_step THEN {WEIGHT} ELSE 0 END))
                                          * 1.0 / SUM({WEIGHT})
                                   FROM steps st WHERE st.session_id = s.session_id), 0.0) END"""


def view(progress: str) -> str:
    return f"""
        SELECT {COLUMNS.format(progress=progress)}
        FROM sessions s
        LEFT JOIN leases l ON l.session_id = s.session_id AND l.step_index = s.current_step
    """


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS session_status")
    op.execute(f"CREATE VIEW session_status AS {view(NEW_PROGRESS)}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS session_status")
    op.execute(f"CREATE VIEW session_status AS {view(OLD_PROGRESS)}")
