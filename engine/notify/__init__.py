"""Webhooks that are never lost: each event a job asked to hear about becomes a delivery,
recorded in the very transaction of the event (the outbox pattern: `record`), and every runner
sends what is due, at least once, signed as Standard Webhooks say, across restarts and crashes
(`deliver`); each attempt and its outcome are events. The rules (what is reported, when to try
again, which addresses are refused) are pure functions (`rules`)."""
