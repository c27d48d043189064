"""`engine serve`: the HTTP app on uvicorn, with a runner (and the inbox) in the same process
unless --no-runner. SIGINT or SIGTERM stops it as `engine run` stops: no new connections, waiting
requests answered 503 with Retry-After (a retry with the same Idempotency-Key finds the same job),
running steps handed back at their next denoising step; a second signal stops it at once."""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading

import uvicorn

from engine.config import Config
from engine.doors.http.shared import Stopping
from engine.errors import ValidationError

log = logging.getLogger("engine.serve")
LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, tokens: list[str]) -> None:
    """A bind beyond this machine without tokens would let anyone on the network submit: refused."""
    if not is_loopback(host) and not tokens:
        raise ValidationError(f"--host {host}: listening beyond this machine needs tokens; set [server] tokens "
                              "(or ENGINE_SERVER_TOKENS=a,b), or bind 127.0.0.1")


def serve(config: Config, host: str | None = None, port: int | None = None, with_runner: bool = True,
          runner_id: str | None = None) -> None:
    from engine.app import require_installation
    from engine.doors.http.app import create_app
    from engine.doors.live import Stopper, init_when_reachable

    host = host or config.get("server", "host")
    port = int(port if port is not None else config.get("server", "port"))
    check_bind(host, list(config.get("server", "tokens") or []))
    require_installation(config)
    engine = init_when_reachable(config, until_idle=False)
    if engine is None:
        return
    stopping = Stopping()
    if not config.get("notify", "public_url"):  # image links in webhook bodies point here
        config.values["notify"]["public_url"] = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    runner = engine.runner(runner_id=runner_id) if with_runner else None
    inbox = engine.inbox() if with_runner else None
    worker = threading.Thread(target=runner.run, name="engine-runner", daemon=True) if runner else None
    stopper = Stopper(runner, config.get("runner", "stop_timeout_seconds")) if runner else None
    app = create_app(engine, stopping, runner_live=lambda: worker is None or worker.is_alive())

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            stopping.event.set()
            if stopper is not None:
                stopper.on_signal(sig, frame)
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                   timeout_graceful_shutdown=10, lifespan="off"))
    if inbox is not None:
        inbox.scan()
        inbox.start()
    if worker is not None:
        worker.start()
    log.info("serving on http://%s:%d (%s)", host, port, "with a runner" if runner else "no runner here")
    # uvicorn raises the signal it caught again once it has stopped: what it finds then is a
    # handler that lets the runner's stop below run (a signal after that stops at once).
    previous = {number: signal.signal(number, lambda *_: None) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
        for number in previous:
            signal.signal(number, stopper.on_signal if stopper else signal.default_int_handler)
    finally:
        stopping.event.set()
        if inbox is not None:
            inbox.stop()
        if runner is not None:
            runner.interrupt()
            worker.join(timeout=config.get("runner", "stop_timeout_seconds"))
            runner.close()
        engine.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
        log.info("stopped serving")
