"""A webhook receiver for the tests: a real HTTP server on 127.0.0.1 in a thread, answering each
request as its script says (an HTTP status, "stall" to answer only after a delay, "redirect"), and
keeping every request it was sent (headers and body)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    def __init__(self, script: list | None = None, port: int = 0, stall_seconds: float = 3.0,
                 answer: bytes = b"ok") -> None:
        self.script = list(script or [])  # what to answer, request by request; then 200
        self.stall_seconds, self.answer = stall_seconds, answer
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                              "body": body.decode(errors="replace"), "raw": body, "at": time.time()})
                    step = receiver.script.pop(0) if receiver.script else 200
                if step == "stall":
                    time.sleep(receiver.stall_seconds)
                    step = 200
                if step == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "/elsewhere")
                    self.end_headers()
                    return
                self.send_response(int(step))
                self.send_header("Content-Length", str(len(receiver.answer)))
                self.end_headers()
                try:
                    self.wfile.write(receiver.answer)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def ids(self) -> list[str]:
        with self.lock:
            return [r["headers"].get("webhook-id") for r in self.requests]

    def bodies(self) -> list[dict]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
