"""initial schema: event log, projections, leases, views

Revision ID: 0001
Revises: 
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

# The contract's read-only views, as they stood at this revision.
VIEWS = {
    "session_status": """
        SELECT s.session_id, s.job_id, s.workflow_id, s.status, s.current_step, s.total_steps,
               CASE WHEN s.total_steps = 0 OR s.status = 'completed' THEN 1.0
                    ELSE (s.current_step + COALESCE(l.progress, 0.0)) * 1.0 / s.total_steps END AS progress,
               s.priority, s.created_at, s.started_at, s.updated_at, s.finished_at,
               s.error_code, s.error_message
        FROM sessions s
        LEFT JOIN leases l ON l.session_id = s.session_id AND l.step_index = s.current_step
    """,
    "batch_status": """
        SELECT b.batch_id, b.job_id, b.status, b.total_items, b.completed_items, b.failed_items,
               CASE WHEN b.total_items = 0 THEN 1.0
                    ELSE (b.completed_items + b.failed_items + b.cancelled_items) * 1.0 / b.total_items
               END AS progress,
               b.created_at, b.updated_at, b.finished_at
        FROM batches b
    """,
    "step_status": """
        SELECT st.session_id, st.step_index, st.step_type, st.domain, st.status, st.attempts,
               st.started_at, st.finished_at, st.error_code
        FROM steps st
    """,
    "event_log": """
        SELECT event_id, stream_type, stream_id, seq, type, data, created_at FROM events
    """,
}


def upgrade() -> None:
    op.create_table('batches',
    sa.Column('batch_id', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.String(length=256), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('run', sa.Integer(), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('config', sa.Text(), nullable=False),
    sa.Column('total_items', sa.Integer(), nullable=False),
    sa.Column('completed_items', sa.Integer(), nullable=False),
    sa.Column('failed_items', sa.Integer(), nullable=False),
    sa.Column('cancelled_items', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.Column('started_at', sa.String(length=32), nullable=True),
    sa.Column('updated_at', sa.String(length=32), nullable=False),
    sa.Column('finished_at', sa.String(length=32), nullable=True),
    sa.Column('last_seq', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('batch_id')
    )
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.create_index('ix_batches_job_id', ['job_id'], unique=False)

    op.create_table('events',
    sa.Column('event_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('stream_type', sa.String(length=16), nullable=False),
    sa.Column('stream_id', sa.String(length=128), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('type', sa.String(length=48), nullable=False),
    sa.Column('data', sa.Text(), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.PrimaryKeyConstraint('event_id'),
    sa.UniqueConstraint('stream_type', 'stream_id', 'seq', name='uq_events_stream_seq')
    )
    op.create_table('items',
    sa.Column('batch_id', sa.String(length=64), nullable=False),
    sa.Column('item_index', sa.Integer(), nullable=False),
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('updated_at', sa.String(length=32), nullable=False),
    sa.PrimaryKeyConstraint('batch_id', 'item_index')
    )
    op.create_table('jobs',
    sa.Column('job_key', sa.String(length=300), nullable=False),
    sa.Column('job_id', sa.String(length=256), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('file_name', sa.Text(), nullable=True),
    sa.Column('content_hash', sa.String(length=64), nullable=True),
    sa.Column('target_type', sa.String(length=16), nullable=True),
    sa.Column('target_id', sa.String(length=64), nullable=True),
    sa.Column('error_code', sa.String(length=32), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.Column('updated_at', sa.String(length=32), nullable=False),
    sa.Column('last_seq', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('job_key')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_hash', ['content_hash'], unique=False)

    op.create_table('leases',
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('step_index', sa.Integer(), nullable=False),
    sa.Column('run', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('runner_id', sa.String(length=128), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('message', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('session_id', 'step_index')
    )
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index('ix_leases_expiry', ['expires_at'], unique=False)

    op.create_table('models',
    sa.Column('model_key', sa.String(length=300), nullable=False),
    sa.Column('model_id', sa.String(length=128), nullable=False),
    sa.Column('runner_id', sa.String(length=128), nullable=False),
    sa.Column('loaded', sa.Integer(), nullable=False),
    sa.Column('loads', sa.Integer(), nullable=False),
    sa.Column('device', sa.String(length=32), nullable=True),
    sa.Column('file', sa.Text(), nullable=True),
    sa.Column('file_hash', sa.String(length=64), nullable=True),
    sa.Column('updated_at', sa.String(length=32), nullable=False),
    sa.Column('last_seq', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('model_key')
    )
    op.create_table('sessions',
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.String(length=256), nullable=True),
    sa.Column('batch_id', sa.String(length=64), nullable=True),
    sa.Column('item_index', sa.Integer(), nullable=True),
    sa.Column('workflow_id', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('run', sa.Integer(), nullable=False),
    sa.Column('current_step', sa.Integer(), nullable=False),
    sa.Column('total_steps', sa.Integer(), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('params', sa.Text(), nullable=False),
    sa.Column('steps', sa.Text(), nullable=False),
    sa.Column('error_code', sa.String(length=32), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('created_event', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.Column('started_at', sa.String(length=32), nullable=True),
    sa.Column('updated_at', sa.String(length=32), nullable=False),
    sa.Column('finished_at', sa.String(length=32), nullable=True),
    sa.Column('last_seq', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('session_id')
    )
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.create_index('ix_sessions_batch', ['batch_id'], unique=False)
        batch_op.create_index('ix_sessions_claim', ['status', 'priority', 'created_event'], unique=False)
        batch_op.create_index('ix_sessions_job_id', ['job_id'], unique=False)

    op.create_table('steps',
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('step_index', sa.Integer(), nullable=False),
    sa.Column('run', sa.Integer(), nullable=False),
    sa.Column('step_type', sa.String(length=64), nullable=False),
    sa.Column('domain', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('not_before', sa.Float(), nullable=True),
    sa.Column('started_at', sa.String(length=32), nullable=True),
    sa.Column('finished_at', sa.String(length=32), nullable=True),
    sa.Column('duration_s', sa.Float(), nullable=True),
    sa.Column('error_code', sa.String(length=32), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('output', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('session_id', 'step_index')
    )
    with op.batch_alter_table('steps', schema=None) as batch_op:
        batch_op.create_index('ix_steps_status', ['status'], unique=False)
    for name, sql in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    with op.batch_alter_table('steps', schema=None) as batch_op:
        batch_op.drop_index('ix_steps_status')

    op.drop_table('steps')
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_index('ix_sessions_job_id')
        batch_op.drop_index('ix_sessions_claim')
        batch_op.drop_index('ix_sessions_batch')

    op.drop_table('sessions')
    op.drop_table('models')
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_index('ix_leases_expiry')

    op.drop_table('leases')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_hash')

    op.drop_table('jobs')
    op.drop_table('items')
    op.drop_table('events')
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_index('ix_batches_job_id')

    op.drop_table('batches')
