"""`engine serve`: the HTTP app on uvicorn, with a runner (and the inbox) in the same process
unless --no-runner. SIGINT or SIGTERM stops it as `engine run` stops: no new connections, waiting
requests answered 503 with Retry-After (a retry with the same Idempotency-Key finds the same job),
running steps handed back at their next denoising step; a second signal stops it at once."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from engine.config import Config
from engine.doors.http.shared import Stopping
from engine.errors import ValidationError
from engine.host import Host, signals_handled

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
    from engine.doors.http.app import create_app

    address = host or config.get("server", "host")
    port = int(port if port is not None else config.get("server", "port"))
    check_bind(address, list(config.get("server", "tokens") or []))
    hosted = Host(config, with_runner=with_runner, runner_id=runner_id)
    if not hosted.open():
        return
    engine, stopping = hosted.engine, Stopping(hosted.stopping)
    if not config.get("notify", "public_url"):  # image links in webhook bodies point here
        config.values["notify"]["public_url"] = f"http://{address if ':' not in address else f'[{address}]'}:{port}"
    app = create_app(engine, stopping, runner_live=hosted.runner_live)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            hosted.stopper.on_signal(sig, frame)
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=address, port=port, log_config=None, access_log=False,
                                   timeout_graceful_shutdown=10, lifespan="off"))
    hosted.start_background()
    log.info("serving on http://%s:%d (%s)", address, port, "with a runner" if with_runner else "no runner here")
    try:
        # uvicorn raises the signal it caught again once it has stopped: what it finds then is a
        # handler that lets the host's stop run (a signal after that stops at once).
        with signals_handled(lambda *_: None):
            server.run()
    finally:
        stopping.event.set()
        hosted.close()
        log.info("stopped serving")
