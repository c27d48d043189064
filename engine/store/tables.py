"""SQLAlchemy Core tables: the append-only event log, its projections, and the contract's views.

`events` is the truth. `sessions`, `steps`, `batches`, `items`, `jobs` and `models` are
projections: they change only by folding new events through the reducer, in the transaction that
appends them. The contract's read-only views over them are created by the Alembic migrations. `leases` (who owns
a running step until when, live progress) and `runners` (which runner processes live where) are
operational state: not rebuilt from events; a running step without a live lease is recovered.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

EventId = BigInteger().with_variant(Integer(), "sqlite")

events = Table(
    "events",
    metadata,
    Column("event_id", EventId, primary_key=True, autoincrement=True),
    Column("stream_type", String(16), nullable=False),
    Column("stream_id", String(128), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("type", String(48), nullable=False),
    Column("data", Text, nullable=False),
    Column("created_at", String(32), nullable=False),
    UniqueConstraint("stream_type", "stream_id", "seq", name="uq_events_stream_seq"),
)

sessions = Table(
    "sessions",
    metadata,
    Column("session_id", String(64), primary_key=True),
    Column("job_id", String(256)),
    Column("batch_id", String(64)),
    Column("item_index", Integer),
    Column("workflow_id", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("run", Integer, nullable=False),
    Column("current_step", Integer, nullable=False),
    Column("total_steps", Integer, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("params", Text, nullable=False),
    Column("steps", Text, nullable=False),
    Column("error_code", String(32)),
    Column("error_message", Text),
    Column("created_event", EventId, nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("started_at", String(32)),
    Column("updated_at", String(32), nullable=False),
    Column("finished_at", String(32)),
    Column("last_seq", Integer, nullable=False),
    # The claim queue (see reducer._set_ready): 1 when the current step may be claimed from ready_at on.
    Column("ready", Integer, nullable=False, server_default="0"),
    Column("ready_at", Float),
    # The current step's compatibility key while it is ready (see engine.run.grouping): partners of a
    # group claim are found by it.
    Column("group_key", String(64)),
    # The device the session is pinned to ("" for any) and its model ("" for none): a worker claims
    # only what its device may run, and prefers the models it has warm (see engine.run.affinity).
    Column("device", String(32), nullable=False, server_default=""),
    Column("model", String(256), nullable=False, server_default=""),
    # The job's own webhook ({url, events} as JSON), if it named one (engine.notify).
    Column("notify", Text),
    # Who it is for: fair share between owners and their limits (engine.run.fairshare, engine.owners).
    Column("owner", String(64), nullable=False, server_default="default"),
)
Index("ix_sessions_status", sessions.c.status)
Index("ix_sessions_ready", sessions.c.ready, sessions.c.priority.desc(), sessions.c.created_event)
Index("ix_sessions_job_id", sessions.c.job_id)
Index("ix_sessions_batch", sessions.c.batch_id)
Index("ix_sessions_owner_ready", sessions.c.ready, sessions.c.priority, sessions.c.owner, sessions.c.created_event)
Index("ix_sessions_owner_status", sessions.c.owner, sessions.c.status)
Index("ix_sessions_created_event", sessions.c.created_event)
Index("ix_sessions_group", sessions.c.group_key, sessions.c.ready, sessions.c.priority.desc(), sessions.c.created_event)

steps = Table(
    "steps",
    metadata,
    Column("session_id", String(64), primary_key=True),
    Column("step_index", Integer, primary_key=True),
    Column("run", Integer, nullable=False),
    Column("step_type", String(64), nullable=False),
    Column("domain", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("not_before", Float),
    Column("started_at", String(32)),
    Column("finished_at", String(32)),
    Column("duration_s", Float),
    Column("error_code", String(32)),
    Column("error_message", Text),
    Column("output", Text),
    Column("group_key", String(64)),
    # Times the step was taken back from a runner that died: attempts, but not failures.
    Column("recoveries", Integer, nullable=False, server_default="0"),
)
Index("ix_steps_group", steps.c.group_key)

batches = Table(
    "batches",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("job_id", String(256)),
    Column("status", String(16), nullable=False),
    Column("run", Integer, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("config", Text, nullable=False),
    Column("total_items", Integer, nullable=False),
    Column("completed_items", Integer, nullable=False),
    Column("failed_items", Integer, nullable=False),
    Column("cancelled_items", Integer, nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("started_at", String(32)),
    Column("updated_at", String(32), nullable=False),
    Column("finished_at", String(32)),
    Column("last_seq", Integer, nullable=False),
    # BatchMetrics, from its items' completions (see reducer._count_call).
    Column("total_calls", Integer, nullable=False, server_default="0"),
    Column("total_images", Integer, nullable=False, server_default="0"),
    Column("call_seconds", Float, nullable=False, server_default="0"),
    Column("memory_peak", BigInteger),
    Column("last_call_id", String(32)),
    Column("name", Text, nullable=False, server_default=""),  # a client's label; not an id
    Column("notify", Text),
    Column("owner", String(64), nullable=False, server_default="default"),
)
Index("ix_batches_job_id", batches.c.job_id)

items = Table(
    "items",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("item_index", Integer, primary_key=True),
    Column("session_id", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("updated_at", String(32), nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("job_key", String(300), primary_key=True),
    Column("job_id", String(256)),
    Column("status", String(16), nullable=False),
    Column("file_name", Text),
    Column("content_hash", String(64)),
    Column("target_type", String(16)),
    Column("target_id", String(64)),
    Column("error_code", String(32)),
    Column("error_message", Text),
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    Column("last_seq", Integer, nullable=False),
    # What identifies the very file taken (see engine.ingest.seen); where it was moved; why it could not be.
    Column("file_identity", String(64)),
    Column("stored_as", Text),
    Column("move_error", Text),
)
Index("ix_jobs_hash", jobs.c.content_hash)
Index("ix_jobs_identity", jobs.c.file_identity)
Index("ix_jobs_job_id", jobs.c.job_id)

models = Table(
    "models",
    metadata,
    Column("model_key", String(300), primary_key=True),
    Column("model_id", String(128), nullable=False),
    Column("runner_id", String(128), nullable=False),
    Column("loaded", Integer, nullable=False),
    Column("loads", Integer, nullable=False),
    Column("device", String(32)),
    Column("file", Text),
    Column("file_hash", String(64)),
    Column("updated_at", String(32), nullable=False),
    Column("last_seq", Integer, nullable=False),
)

# What one image of a model, size and mode took on a device, and what a call had (model.measured).
memory_profiles = Table(
    "memory_profiles",
    metadata,
    Column("model_id", String(128), primary_key=True),
    Column("width", Integer, primary_key=True),
    Column("height", Integer, primary_key=True),
    Column("mode", String(32), primary_key=True),
    Column("device", String(32)),
    Column("per_image_bytes", BigInteger, nullable=False),
    Column("available_bytes", BigInteger, nullable=False),
    Column("call_images", Integer, nullable=False),
    Column("updated_at", String(32), nullable=False),
)

leases = Table(
    "leases",
    metadata,
    Column("session_id", String(64), primary_key=True),
    Column("step_index", Integer, primary_key=True),
    Column("run", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("runner_id", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("progress", Float, nullable=False, default=0.0),
    Column("message", Text),
)
Index("ix_leases_expiry", leases.c.expires_at)

# Operational, like leases: each runner process registers and heartbeats (see engine.run.fleet).
runners = Table(
    "runners",
    metadata,
    Column("runner_id", String(128), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("process_started", Float),
    Column("version", String(32)),
    Column("devices", Text),
    Column("warm_models", Text),
    Column("status", String(16), nullable=False),
    Column("started_at", String(32), nullable=False),
    Column("last_heartbeat", String(32), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("memory", Text),  # per worker, as of the last heartbeat (JSON; see engine.domains.memory.usage)
)

# Webhook deliveries (engine.notify): one per event reported to a URL, with its attempts.
deliveries = Table(
    "deliveries",
    metadata,
    Column("delivery_id", String(64), primary_key=True),  # the webhook-id every attempt carries
    Column("target_type", String(16), nullable=False),
    Column("target_id", String(128), nullable=False),
    Column("event_id", EventId, nullable=False),
    Column("event_type", String(48), nullable=False),
    Column("url", Text, nullable=False),
    Column("status", String(16), nullable=False),  # pending, delivered, dead
    Column("attempts", Integer, nullable=False),
    Column("retry_base", Integer, nullable=False, server_default="0"),  # attempts before the last retry by hand
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("next_attempt_at", Float),
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    Column("delivered_at", String(32)),
    Column("last_seq", Integer, nullable=False),
)
Index("ix_deliveries_due", deliveries.c.status, deliveries.c.next_attempt_at)

# Operational, like leases: each owner's place in the fair share (engine.run.fairshare), its
# "finish tag"; the row of owner "" holds the queue's virtual time. Not rebuilt from events.
owner_shares = Table(
    "owner_shares",
    metadata,
    Column("owner", String(64), primary_key=True),
    Column("finish", Float, nullable=False),
)

PROJECTIONS = {
    "sessions": sessions,
    "steps": steps,
    "batches": batches,
    "items": items,
    "jobs": jobs,
    "models": models,
    "memory_profiles": memory_profiles,
    "deliveries": deliveries,
}
