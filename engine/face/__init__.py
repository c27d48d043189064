"""The face: all that a door (the CLI, the stdio worker, the HTTP APIs, the web page) touches of
the engine's inside. A door imports the face, the root (`engine.app`, `engine.host`, the config)
and the errors, and nothing else; `tests/test_house.py` holds it to that.

- `writes`: submitting a job (a file's bytes or a mapping, with one idempotency rule), controls
  with one answer, uploads, retrying a webhook delivery.
- `reads`: the reports, each carrying what a door shows (allowed actions, each image's seed,
  parameters and links, the contact sheet), lists with their cursors, one capabilities shape.
- `follow`: one follower of the event log; `wait`: one wait for a session's end, from the log.
- `words`: the vocabulary doors speak (statuses, actions, schedulers, key cases, the schema).
- `operate`: what an operator runs (rebuild, verify, SQL, warm-up, models, devices, metrics, logs).
"""
