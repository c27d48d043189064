"""`engine`: a thin typer app over the same functions the runner, the inbox and the tests call.

Exit codes: 0 ok, 2 invalid input, 3 not found, 4 invalid transition, 1 anything else.
`--json` gives machine-readable output wherever a table is printed.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.config import Config, load_config
from engine.errors import EngineError, ValidationError

# Help texts name config keys as [section] key: plain text, not rich markup (which would eat them).
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="A crash-proof job orchestrator for image generation.")
models_app = typer.Typer(rich_markup_mode=None, help="The local model registry.", invoke_without_command=True)
app.add_typer(models_app, name="models")
notify_app = typer.Typer(rich_markup_mode=None,
                         help="Webhook deliveries: list them, retry a dead one, make a signing secret.",
                         no_args_is_help=True)
app.add_typer(notify_app, name="notify")
# Piped output is read by scripts and people alike: wide enough that ids are not cut.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="config.toml to use")]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]

_state: dict[str, Any] = {"config": None}


def _version(value: bool) -> None:
    if value:
        from engine import __version__

        print(f"engine {__version__}")
        raise typer.Exit()


class Case(str, Enum):
    snake = "snake"
    camel = "camel"
    pascal = "pascal"


@app.callback()
def _main(config: ConfigOption = None,
          case: Annotated[Case, typer.Option(
              "--case", help="key case of --json output, for clients in other languages (result.json stays snake)",
              case_sensitive=False)] = Case.snake,
          version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                          help="print the version and exit")] = None) -> None:
    _state["config"] = config
    _state["case"] = case


def _print_json(value: Any, **options) -> None:
    from engine.face.words import to_case

    case = _state.get("case", Case.snake).value
    print(json.dumps(to_case(json.loads(json.dumps(value, default=str)), case), **options))


def _config(path: Path | None) -> Config:
    return load_config(path or _state["config"])


def command(fn: Callable) -> Callable:
    """Turn EngineErrors into a clear message and the contract's exit code; a database that cannot
    be reached is one line too (the store's DATABASE_UNAVAILABLE), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EngineError as exc:
            raise _said(exc, kwargs.get("as_json")) from None

    return wrapper


def _said(exc: EngineError, as_json: bool) -> typer.Exit:
    """Say an error as the contract does; returns the exit to raise."""
    if as_json:
        _print_json(exc.to_dict())
    else:
        err.print(f"[bold red]{exc.code}[/]: {escape(exc.message)}", highlight=False)
        for detail in exc.details[:10]:
            err.print(f"  {escape(str(detail))}", highlight=False)
    return typer.Exit(exc.exit_code)


def _confirm(what: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise ValidationError(f"{what}: pass --yes to confirm (no terminal to ask on)")
    if not typer.confirm(f"{what}?"):
        raise typer.Exit(1)


def _table(columns: list[str], rows: list, as_json: bool, title: str | None = None) -> None:
    if as_json:
        _print_json([dict(zip(columns, r)) for r in rows], default=str)
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*["" if v is None else (f"{v:.2f}" if isinstance(v, float) else escape(str(v))) for v in row])
    out.print(table)


@contextmanager
def _opened(path: Path | None) -> Iterator[Any]:
    """The installation of this config (engine.app.Engine), closed afterwards."""
    from engine.app import Engine

    with Engine.open(_config(path)) as engine:
        yield engine


# setting up --------------------------------------------------------------------------------

@app.command()
@command
def init(config: ConfigOption = None) -> None:
    """Create the folders and the database (Alembic upgrade head), and a commented config.toml
    of the defaults where there is none."""
    import os

    from engine.app import Engine
    from engine.config import DEFAULTS_FILE

    chosen = config or _state["config"] or (Path(os.environ["ENGINE_CONFIG"]) if os.environ.get("ENGINE_CONFIG")
                                            else Path("config.toml"))
    wrote = not chosen.exists()
    if wrote:
        chosen.parent.mkdir(parents=True, exist_ok=True)
        chosen.write_text(DEFAULTS_FILE.read_text())
    cfg = _config(chosen)
    Engine.create(cfg).close()
    database = cfg.get("database", "url") or cfg.path("database")
    made = f"; wrote {chosen.resolve()} (the defaults, commented)" if wrote else ""
    out.print(f"initialised {database} (inbox {cfg.inbox}, outbox {cfg.outbox}){made}", highlight=False)


@app.command()
@command
def schema(config: ConfigOption = None) -> None:
    """Print the JSON Schema of job files."""
    from engine.face.words import job_schema

    print(json.dumps(job_schema(), indent=2, sort_keys=True))  # the contract's own names


@app.command()
@command
def demo(config: ConfigOption = None, folder: Annotated[Path, typer.Option(help="where the demo installation goes")] = Path("demo")) -> None:
    """Build a tiny model, drop sample jobs, run them, show the results (random weights: noise)."""
    from engine.doors.demo import run_demo

    run_demo(folder, out)


# running -----------------------------------------------------------------------------------

@app.command()
@command
def run(config: ConfigOption = None,
        until_idle: Annotated[bool, typer.Option("--until-idle", help="exit when nothing is left to do")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no live view")] = False,
        runner_id: Annotated[Optional[str], typer.Option(
            help="a stable id unique to this runner: after a crash it takes its own steps back at once")] = None,
        log_format: Annotated[Optional[str], typer.Option(
            "--log-format", help="log lines on stderr: plain or json (else [logging] format)")] = None,
        metrics_port: Annotated[Optional[int], typer.Option(
            "--metrics-port", help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics")] = None) -> None:
    """Take the inbox and run steps (a live view shows running sessions; log lines go to stderr)."""
    from engine.doors.live import run_with_view
    from engine.face import operate

    cfg = _config(config)
    operate.configure_logs(cfg, log_format)
    if metrics_port is not None:
        operate.serve_metrics(cfg, metrics_port)
    done = run_with_view(cfg, until_idle=until_idle, console=out, live=not quiet and out.is_terminal,
                         runner_id=runner_id)
    out.print(f"{done} step{'' if done == 1 else 's'} done")


@app.command()
@command
def worker(stdio: Annotated[bool, typer.Option("--stdio", help="JSON lines on stdin and stdout (the only transport)")] = False,
           no_runner: Annotated[bool, typer.Option("--no-runner", help="only submit and read: a runner runs elsewhere")] = False,
           client_id: Annotated[Optional[str], typer.Option(
               "--client-id", help="the owner of what this client submits (fair share, limits)")] = None,
           runner_id: Annotated[Optional[str], typer.Option(
               help="a stable id unique to this runner: after a crash it takes its own steps back at once")] = None,
           config: ConfigOption = None) -> None:
    """The design notes' PROCESSING worker: one JSON request a line on stdin, one response a line
    on stdout, logs on stderr (docs/doors/stdio.md has a transcript)."""
    from engine.doors.stdio import run_stdio
    from engine.face import operate

    if not stdio:
        raise ValidationError("engine worker needs --stdio (JSON lines on stdin and stdout)")
    cfg = _config(config)
    operate.configure_logs(cfg)
    run_stdio(cfg, _state.get("case", Case.snake).value, with_runner=not no_runner, client_id=client_id,
              runner_id=runner_id)


@app.command()
@command
def serve(host: Annotated[Optional[str], typer.Option(help="the address to listen on (else [server] host)")] = None,
          port: Annotated[Optional[int], typer.Option(help="the port (else [server] port, 7860)")] = None,
          no_runner: Annotated[bool, typer.Option("--no-runner", help="only the HTTP door: runners run elsewhere")] = False,
          runner_id: Annotated[Optional[str], typer.Option(help="a stable id for this process's runner")] = None,
          log_format: Annotated[Optional[str], typer.Option(
              "--log-format", help="log lines on stderr: plain or json (else [logging] format)")] = None,
          config: ConfigOption = None) -> None:
    """The HTTP door: the native API under /v1, OpenAI's images API and AUTOMATIC1111's /sdapi/v1,
    with a runner and the inbox in this process unless --no-runner (the `server` extra)."""
    from engine.face import operate

    try:
        from engine.doors.http.serve import serve as run_server
    except ImportError as exc:
        raise ValidationError(f"engine serve needs the server extra: pip install 'engine[server]' ({exc})") from None
    cfg = _config(config)
    operate.configure_logs(cfg, log_format)
    run_server(cfg, host, port, with_runner=not no_runner, runner_id=runner_id)


@app.command()
@command
def validate(files: Annotated[list[Path], typer.Argument(help="job files")], config: ConfigOption = None,
             as_json: JsonOption = False) -> None:
    """Check job files exactly as the inbox would, without submitting them: exit 0 when every one
    is valid, else 2 with the error the inbox would write."""
    from engine.face import operate, writes

    reports = []
    with _opened(config) as engine:
        for path in files:
            try:
                writes.check_file(engine, operate.read_job_file(engine, path))
                reports.append({"file": path.name, "ok": True, "error": None})
            except OSError as exc:
                reports.append({"file": path.name, "ok": False, "error": {
                    "code": "NOT_FOUND", "message": f"{path}: {exc.strerror or exc}", "details": []}})
            except EngineError as exc:
                reports.append({"file": path.name, "ok": False, "error": {**exc.to_dict(), "file": path.name}})
    if as_json:
        _print_json(reports)
    else:
        for report in reports:
            error = report["error"]
            out.print(f"{report['file']}: " + ("ok" if report["ok"] else f"[red]{error['code']}[/]: {escape(error['message'])}"),
                      highlight=False)
    if not all(r["ok"] for r in reports):
        raise typer.Exit(2)


@app.command()
@command
def submit(files: list[Path], config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Validate and submit job files directly (image paths stay relative to the inbox)."""
    from engine.face import writes

    results, failed = [], None
    with _opened(config) as engine:
        for path in files:
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise ValidationError(f"{path}: {exc.strerror}") from exc
            try:
                done = writes.submit_file(engine, raw, path.name)
                results.append({"file": str(path), "target_type": done.target_type, "target_id": done.target_id})
            except EngineError as exc:
                failed = failed or exc
                results.append({"file": str(path), **exc.to_dict()})
    if as_json:
        _print_json(results)
    else:
        for r in results:
            if "code" in r:
                err.print(f"{escape(r['file'])}: [red]{r['code']}[/] {escape(r['message'])}", highlight=False)
            else:
                out.print(f"{r['file']}: {r['target_type']} {r['target_id']}", highlight=False)
    if failed:
        raise typer.Exit(failed.exit_code)


# looking -----------------------------------------------------------------------------------

@app.command()
@command
def sessions(config: ConfigOption = None, status: Annotated[Optional[str], typer.Option(help="only this status")] = None,
             limit: Annotated[int, typer.Option(help="at most this many (1 to 1000)")] = 100,
             offset: Annotated[int, typer.Option(help="skip this many first")] = 0,
             batch: Annotated[Optional[str], typer.Option(help="only the items of this batch (its id)")] = None,
             as_json: JsonOption = False) -> None:
    """List sessions, newest first."""
    from engine.face import reads

    with _opened(config) as engine:
        rows = reads.sessions(engine, status=status, limit=limit, offset=offset, batch_id=batch)["sessions"]
    columns = list(reads.SESSION_COLUMNS)
    _table(columns, [tuple(r[c] for c in columns) for r in rows], as_json)


def _session_report(config: Path | None, session_id: str) -> dict:
    from engine.face import reads

    with _opened(config) as engine:
        return reads.session(engine, session_id)


@app.command()
@command
def session(session_id: str, config: ConfigOption = None, as_json: JsonOption = False,
            follow: Annotated[bool, typer.Option("--follow", "-f", help="keep showing until it ends")] = False) -> None:
    """Show one session (by id or job_id): status, steps, params, outbox folder."""
    cfg = _config(config)
    if follow:
        from engine.doors.live import follow_session

        follow_session(cfg, session_id, out, lambda: _session_report(config, session_id))
    report = _session_report(config, session_id)
    if as_json:
        _print_json(report, default=str)
        return
    from engine.doors.live import prompt_start, step_label

    out.print(f"[bold]{report['session_id']}[/] (job {report.get('job_id') or '-'}) {report['workflow_id']} "
              f"[bold]{report['status']}[/] step {step_label(report['status'], report['current_step'], report['total_steps'])}"
              f" ({report['progress']:.0%}) {escape(report['activity'] or '')}", highlight=False)
    out.print(f"prompt: {escape(prompt_start(report['params'], 100))}", highlight=False)
    shown = {k: v for k, v in report["params"].items() if v not in (None, "", [], {}) and k != "prompt"}
    out.print("params: " + escape(", ".join(f"{k}={json.dumps(v)}" for k, v in shown.items())), highlight=False)
    if report["error_code"]:
        out.print(f"[red]{report['error_code']}[/]: {escape(report['error_message'] or '')}", highlight=False)
    if report.get("waiting"):
        out.print(f"[yellow]{escape(report['waiting'])}[/]", highlight=False)
    _table(list(report["steps"][0]) if report["steps"] else [], [tuple(s.values()) for s in report["steps"]], False)
    out.print(f"outbox: {report['outbox']}", highlight=False)
    for image in report["images"]:
        out.print(f"  {image}", highlight=False)


@app.command()
@command
def batches(config: ConfigOption = None, limit: Annotated[int, typer.Option(help="at most this many (1 to 1000)")] = 100,
            offset: Annotated[int, typer.Option(help="skip this many first")] = 0, as_json: JsonOption = False) -> None:
    """List batches, newest first (--json: every column of batch_status, and the name)."""
    from engine.face import reads

    with _opened(config) as engine:
        shown = reads.batches(engine, limit=limit, offset=offset)
    if as_json:
        _print_json(shown)
        return
    _table(["batch_id", "name or job", "status", "done", "failed", "progress", "created_at"],
           [(b["batch_id"], b["name"] or b["job_id"], b["status"], f"{b['completed_items']}/{b['total_items']}",
             b["failed_items"], f"{b['progress']:.0%}", b["created_at"][:19]) for b in shown], False)


@app.command()
@command
def batch(batch_id: str, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show one batch (by id or job_id) and its items."""
    from engine.face import reads

    with _opened(config) as engine:
        report = reads.batch(engine, batch_id)
    if as_json:
        _print_json(report, default=str)
        return
    name = f" {escape(report['name'])}" if report["name"] else ""
    out.print(f"[bold]{report['batch_id']}[/]{name} (job {report['job_id'] or '-'}) [bold]{report['status']}[/] "
              f"{report['completed_items']}/{report['total_items']} completed, {report['failed_items']} failed "
              f"({report['progress']:.0%})", highlight=False)
    metrics = {"pipeline calls": f"{report['completed_batches']}/{report['total_batches']}",
               "images": report["total_images_generated"], "seconds a call": report["average_batch_time"],
               "images/s": report["images_per_second"], "peak memory": _gib(report["memory_usage_peak"]),
               "left": f"about {report['estimated_time_remaining']:.0f} s"
               if report["estimated_time_remaining"] is not None else None}
    out.print("metrics: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in metrics.items() if v is not None), highlight=False)
    items = report["items"]
    _table(list(items[0]) if items else [], [tuple(i.values()) for i in items], False)
    if report["contact_sheet"]:
        out.print(f"contact sheet: {report['contact_sheet']['path']}", highlight=False)


def _gib(value: Any) -> str | None:
    return None if value is None else f"{value / 2**30:.2f} GiB"


@app.command()
@command
def runners(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """The runners that registered with this database: host, pid, devices, warm models, last
    heartbeat, version; one whose heartbeat lapsed shows as gone (its steps are taken back)."""
    from engine.face import reads

    with _opened(config) as engine:
        rows = reads.runners(engine)
    columns = ["runner_id", "host", "pid", "status", "devices", "warm_models", "last_heartbeat", "version"]
    _table(columns, [tuple(r[c] for c in columns) for r in rows], as_json)


@app.command()
@command
def events(target: str, config: ConfigOption = None,
           after: Annotated[int, typer.Option(help="only events after this event_id")] = 0,
           as_json: JsonOption = False) -> None:
    """The events of a session or batch (by id or job_id), oldest first."""
    from engine.face import reads

    with _opened(config) as engine:
        found = reads.events(engine, target, after=after)["events"]
    if as_json:
        _print_json(found)
        return
    _table(["event_id", "seq", "type", "data", "created_at"],
           [(e["event_id"], e["seq"], e["type"], json.dumps(e["data"], sort_keys=True)[:200], e["created_at"])
            for e in found], False)


# controlling -------------------------------------------------------------------------------

def _control(action: str, target: str, config: Path | None, as_json: bool, priority: int | None = None) -> None:
    from engine.face import writes

    with _opened(config) as engine:  # result.json of what it ended is written before this returns
        answer = writes.control(engine, target, action, priority)
    if as_json:
        _print_json(answer)
    else:
        out.print(f"{action}: {answer['target_type']} {answer['target_id']} ({', '.join(answer['events'])})",
                  highlight=False)


@app.command()
@command
def pause(target: str, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Pause a session or batch (takes effect at the next denoising step or step boundary)."""
    _control("pause", target, config, as_json)


@app.command()
@command
def resume(target: str, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Resume a paused session or batch (also starts one created with "hold": true)."""
    _control("resume", target, config, as_json)


@app.command()
@command
def cancel(target: str, config: ConfigOption = None, as_json: JsonOption = False, yes: YesOption = False) -> None:
    """Cancel a session or batch; a running step is interrupted."""
    _confirm(f"cancel {target}", yes)
    _control("cancel", target, config, as_json)


@app.command()
@command
def priority(target: str, value: int = typer.Argument(..., help="the new priority, 0 to 1000 (higher runs first)"),
             config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Give a session or batch (every item not yet ended) a new priority: the next claim sees it."""
    _control("priority", target, config, as_json, value)


@app.command()
@command
def restart(target: str, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Start a new run of a failed, cancelled or completed session or batch (old events are kept)."""
    _control("restart", target, config, as_json)


@app.command()
@command
def delete(target: str, config: ConfigOption = None, as_json: JsonOption = False, yes: YesOption = False) -> None:
    """Remove a session or batch from the status tables (its events and outbox files are kept)."""
    _confirm(f"delete {target}", yes)
    _control("delete", target, config, as_json)


@app.command()
@command
def rebuild(config: ConfigOption = None, verify: Annotated[bool, typer.Option("--verify", help="only compare")] = False,
            yes: YesOption = False, as_json: JsonOption = False) -> None:
    """Drop the status tables and replay the event log (--verify: report differences only)."""
    from engine.face import operate

    started = time.perf_counter()
    if verify:
        with _opened(config) as engine:
            differences = operate.verify(engine)
        if as_json:
            _print_json({"differences": differences})
        else:
            for line in differences[:200]:
                out.print(line, highlight=False)
            out.print(f"{len(differences)} differences ({time.perf_counter() - started:.2f}s)")
        if differences:
            raise typer.Exit(1)
        return
    with _opened(config) as engine:
        _confirm("drop and rebuild every status table from the event log", yes)
        counts = operate.rebuild(engine)
    if as_json:
        _print_json(counts)
    else:
        rows = ", ".join(f"{count} {table}" for table, count in counts.items())
        out.print(f"rebuilt from the event log in {time.perf_counter() - started:.2f}s: {rows}", highlight=False)


# the catalogue -----------------------------------------------------------------------------

@app.command()
@command
def workflows(workflow_id: Annotated[Optional[str], typer.Argument()] = None, config: ConfigOption = None,
              params: Annotated[Optional[str], typer.Option(help="params JSON for the estimate")] = None,
              as_json: JsonOption = False) -> None:
    """List workflow templates, or show one's steps with a memory and time estimate."""
    from engine.face import operate

    cfg = _config(config)
    if workflow_id is None:
        rows = [(w.id, len(w.steps), w.description) for w in operate.workflows(cfg).values()]
        _table(["id", "steps", "description"], rows, as_json)
        return
    try:
        raw = json.loads(params) if params else {}
    except json.JSONDecodeError as exc:
        raise ValidationError(f"--params: not valid JSON: {exc.msg} at column {exc.colno}") from None
    shown = operate.workflow_estimate(cfg, workflow_id, raw)
    steps, guess = shown["steps"], shown["estimate"]
    if as_json:
        _print_json(shown)
        return
    out.print(f"[bold]{shown['id']}[/]: {shown['description']}", highlight=False)
    _table(["index", "type", "domain", "config"], [(i, s["type"], s["domain"], json.dumps(s["config"]))
                                                    for i, s in enumerate(steps)], False)
    memory = f"{guess['memory_gib']} GiB" if guess.get("memory_gib") is not None else "unknown memory"
    seconds = f"about {guess['seconds']:.0f} s" if guess.get("seconds") is not None else "unknown time"
    size = f"{guess['width']}x{guess['height']}" if guess.get("width") else "default size"
    out.print(f"estimate on {guess.get('device')}: {memory}, {seconds} for {size} "
              f"({guess.get('note') or 'a rough order of magnitude'})", highlight=False)


@app.command()
@command
def devices(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Devices found: DirectML, CUDA, MPS and CPU, with memory and precision support."""
    from engine.face import operate

    found = operate.devices()
    columns = ["id", "kind", "name", "total_memory", "free_memory", "fp16", "bf16"]
    _table(columns, [tuple(getattr(d, c) for c in columns) for d in found], as_json)


@models_app.callback()
@command
def models(ctx: typer.Context, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List the registered models."""
    if ctx.invoked_subcommand:
        _state["models_config"] = config
        return
    from engine.face import operate

    cfg = _config(config)
    registry = operate.model_catalogue(cfg)
    entries = registry.entries().values()
    try:
        default_id = registry.default_pipeline().id
    except EngineError:
        default_id = None  # none registered, or [models] default names none: a job that names none is refused
    if not entries and not as_json:
        err.print(f"no models are registered in {escape(str(cfg.models_dir))}. Register one with `engine models add "
                  "PATH --id ID` (a diffusers folder or a .safetensors file). To try the engine without one, "
                  "`engine demo` builds a tiny random-weight model (demo/models/tiny-sdxl) that `engine models add "
                  "demo/models/tiny-sdxl --id tiny` registers here.", highlight=False)
        return
    default_compile = "on" if cfg.get("compile", "default") else "off"
    precision = f"{operate.default_precision(cfg)} (default)"
    needs = {e.id: operate.model_needs(e, cfg) or {} for e in entries}
    _table(["id", "kind", "default", "format", "family", "variant", "context_dim", "compile", "precision", "needs_gib",
            "least_gib", "path", "configs_from"],
           [(e.id, e.kind, e.id == default_id, e.format, e.family or "unknown", e.variant or None, e.context_dim or None,
             (e.compile or f"{default_compile} (default)") if e.kind == "pipeline" else None,
             (e.precision or precision) if e.kind == "pipeline" else None, needs[e.id].get("needs_gib"),
             needs[e.id].get("least_gib"), e.path, e.configs_from)
            for e in entries], as_json)


@notify_app.command("list")
@command
def notify_list(status: Annotated[Optional[str], typer.Option(help="pending, delivered or dead")] = None,
                target: Annotated[Optional[str], typer.Option(help="one session or batch id")] = None,
                limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 100,
                config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Webhook deliveries: the event, the URL, attempts, the last answer, the next attempt."""
    from engine.face import reads

    with _opened(config) as engine:
        rows = reads.deliveries(engine, status, limit, target)
    columns = ["id", "event", "target_id", "url", "status", "attempts", "last_status", "last_error", "next_attempt"]
    _table(columns, [tuple(r[c] for c in columns) for r in rows], as_json)


@notify_app.command("retry")
@command
def notify_retry(delivery_id: str, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Send a dead (or waiting) delivery again now, with a fresh budget of attempts."""
    from engine.face import writes

    with _opened(config) as engine:
        appended = writes.retry_delivery(engine, delivery_id)
    if as_json:
        _print_json({"delivery_id": delivery_id, "events": [e.type for e in appended]})
    else:
        out.print(f"delivery {delivery_id} is due again (a runner sends it)", highlight=False)


@notify_app.command("new-secret")
@command
def notify_new_secret() -> None:
    """Print a new signing secret for [notify] secret (whsec_ and 32 random bytes in base64)."""
    import base64
    import secrets

    print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())


@models_app.command("add")
@command
def models_add(path: Path, model_id: Annotated[str, typer.Option("--id", help="the id jobs will use")],
               kind: Annotated[Optional[str], typer.Option(help="override the guessed kind")] = None,
               configs_from: Annotated[Optional[Path], typer.Option(
                   "--configs-from", help="for a single-file checkpoint: a diffusers pipeline folder of the same "
                   "architecture, whose configs and tokenizers it is loaded with (offline)")] = None,
               replace: Annotated[bool, typer.Option("--replace", help="replace a model already registered under this id")] = False,
               compile_setting: Annotated[Optional[str], typer.Option(
                   "--compile", help="the compiled fast path for this pipeline: on or off (else [compile] default)")] = None,
               precision: Annotated[Optional[str], typer.Option(
                   help="fp16, bf16, fp32, or fp8 (float8 attention layers; else [models] precision)")] = None,
               config: ConfigOption = None) -> None:
    """Register a diffusers folder or a .safetensors file under an id."""
    with _opened(config or _state.get("models_config")) as engine:
        registry = engine.models
        if model_id in registry.entries() and not replace:
            raise ValidationError(f"--id {model_id!r} is registered already ({registry.entries()[model_id].path}); "
                                  "pass --replace to replace it")
        if compile_setting not in (None, "on", "off"):
            raise ValidationError(f"--compile {compile_setting!r}: on or off")
        entry = registry.add(path, model_id, kind, configs_from, compile_setting or "", precision or "")
    out.print(f"added {entry.id}: {entry.kind} ({entry.format}) at {entry.path}", highlight=False)


@app.command()
@command
def warmup(model_id: Annotated[str, typer.Argument(help="a registered pipeline's id")],
           sizes: Annotated[str, typer.Option(help="image sizes, comma-separated WIDTHxHEIGHT")] = "1024x1024",
           batch_sizes: Annotated[str, typer.Option(help="images per call, comma-separated")] = "1,2,4,8",
           steps: Annotated[int, typer.Option(min=1, max=50, help="denoising steps per warm-up call")] = 3,
           config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Compile a model's fast path ahead (minutes, once per machine), for these sizes and call sizes."""
    from rich.progress import Progress

    from engine.face import operate

    cfg = _config(config)
    shapes = operate.shapes_of(sizes)
    try:
        counts = sorted({int(n) for n in batch_sizes.split(",") if n.strip()})
    except ValueError:
        raise ValidationError(f"--batch-sizes {batch_sizes!r}: comma-separated whole numbers") from None
    if not counts or min(counts) < 1 or max(counts) > cfg.get("limits", "max_num_images") * 4:
        raise ValidationError(f"--batch-sizes {batch_sizes!r}: between 1 and {cfg.get('limits', 'max_num_images') * 4}")
    with _opened(config) as engine, Progress(console=err, disable=as_json) as progress:
        task = progress.add_task(f"compiling {model_id}", total=shapes * len(counts))

        def done(shape, seconds, compiled) -> None:
            progress.advance(task)
            progress.console.print(f"{shape[1]} x {shape[2]}x{shape[3]}: {seconds:.1f} s "
                                   f"({'compiled' if compiled else 'eager: the compile failed'})", highlight=False)

        report = operate.warmup(engine, model_id, sizes, counts, steps, done)
    if as_json:
        _print_json(report)
    failed = [r for r in report if not r["compiled"]]
    if failed:  # the calls were made eagerly; a caller (a runner's background compile) must know
        err.print(f"could not compile {model_id}: {failed[0]['error']}", highlight=False)
        raise typer.Exit(1)


@app.command()
@command
def sql(query: str, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Run one read-only SQL statement: one SELECT (WITH, VALUES, a reading PRAGMA), within
    [database] sql_timeout_seconds and at most sql_max_rows rows, sql_max_bytes in all and
    sql_max_value_bytes a value (stderr says what was cut); on PostgreSQL as the role of
    [database] readonly_url."""
    from engine.face import operate

    columns, rows = operate.sql(_config(config), query, lambda note: err.print(f"[yellow]{escape(note)}[/]",
                                                                               highlight=False))
    _table(columns, rows, as_json)


@app.command("sql-role")
@command
def sql_role(name: Annotated[str, typer.Argument(help="the role to create or bring up to date")],
             password: Annotated[Optional[str], typer.Option(help="its password (else none: trust or peer auth)")] = None,
             config: ConfigOption = None) -> None:
    """PostgreSQL: make a role that can only read this database, for `engine sql`; prints the URL
    to put in [database] readonly_url (ENGINE_DATABASE_READONLY_URL)."""
    from engine.face import operate

    print(operate.sql_role(_config(config), name, password))


def _case_first(argv: list[str]) -> list[str]:
    """`--case` is the app's option, also where a user writes it after the command
    (`engine sessions --json --case camel`)."""
    for index, arg in enumerate(argv):
        if arg == "--case" and index + 1 < len(argv):
            return ["--case", argv[index + 1], *argv[:index], *argv[index + 2:]]
        if arg.startswith("--case="):
            return [arg, *argv[:index], *argv[index + 1:]]
    return argv


def main() -> None:
    from engine.app import quiet_libraries

    quiet_libraries()
    app(args=_case_first(sys.argv[1:]), prog_name="engine")
