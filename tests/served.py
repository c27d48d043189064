"""An `engine serve` process for the tests: started for an installation, waited for until it
answers /healthz, stopped with the signal a test names."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import Installation


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served:
    """An `engine serve` process for an installation, and its base URL."""

    def __init__(self, install: Installation, *options: str, env: dict | None = None, port: int | None = None) -> None:
        self.install, self.port = install, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(install.folder / f"serve-{self.port}-{time.monotonic_ns()}.log", "w+")
        self.process = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(self.port), *options],
                                        env={**install.env(), **(env or {})}, cwd=install.folder,
                                        stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, self.said()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "engine serve did not come up"
            time.sleep(0.2)

    def stop(self, number: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(number)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.log.close()

    def said(self) -> str:
        """What the server logged (for a failing assertion's message)."""
        self.log.flush()
        return Path(self.log.name).read_text()
