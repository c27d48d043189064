"""The web page of `engine serve`, at `/`: the queue with live progress, a session's timeline and
images, a batch, the gallery, a submit form built from the job schema, and the runners.

Server-rendered (Jinja2) over the one read API (`engine.queries`); every action is a call to the
HTTP API under /v1 from one small script (static/engine.js, no build step, nothing from the
internet); live updates come from /v1/events. Templates and script ship inside the package."""
