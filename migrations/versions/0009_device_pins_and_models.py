"""device pins and models in the claim queue: one worker per device, model affinity

A runner runs one worker per device. The claim query must skip sessions pinned to another device
(`device` in a job's params) without reading their params, and a worker prefers sessions whose model
it has warm: each session row carries its pinned device ("" for none) and its model ("" for none).

Revision ID: 0009
Revises: 0008
"""
import json

from alembic import op
import sqlalchemy as sa


revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _pin(params: dict) -> str:
    wanted = str(params.get("device") or "").strip().lower()
    return "" if wanted == "auto" else wanted


def upgrade() -> None:
    op.add_column("sessions", sa.Column("device", sa.String(length=32), nullable=False, server_default=""))
    op.add_column("sessions", sa.Column("model", sa.String(length=256), nullable=False, server_default=""))
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT session_id, params FROM sessions")).all()
    for session_id, text in rows:
        params = json.loads(text or "{}")
        if _pin(params) or params.get("model"):
            conn.execute(sa.text("UPDATE sessions SET device = :d, model = :m WHERE session_id = :s"),
                         {"d": _pin(params), "m": str(params.get("model") or ""), "s": session_id})


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+), not a table copy: the views over these tables stay valid.
    op.drop_column("sessions", "model")
    op.drop_column("sessions", "device")
