"""Several hosts on one PostgreSQL, with real network separation on one machine.

Each "host" is a network namespace joined to this machine by a veth pair, with its own hostname
(a UTS namespace): runners there cannot tell one another's processes apart and rely on leases, as on
separate machines. PostgreSQL is reached on the host side's address of each link (a byte relay
there forwards to the server, which listens on 127.0.0.1 only). All runners share one folder for the
inbox, the outbox and the models, as they would an NFS or SMB share.

The run: 2,100 file-writing steps and three tiny-model sessions dropped into the shared inbox as
job files; one runner is killed with SIGKILL mid-way; later another host's link is cut for longer
than the lease while it holds a step: the others take that step over, and when the link comes back
the late result is refused (fencing). Every step completes once, every file is published once,
every job file is taken once, and the log rebuilds to the live tables.

Skipped, saying why, where namespaces cannot be made (not root, no `ip`) or no PostgreSQL is named.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_URL, ROOT, TEST_WORKFLOWS, _drop, _postgres_database, write_config
from tests.helpers import completions

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

LEASE = 2.0


def _can_make_namespaces() -> str | None:
    if not POSTGRES_URL:
        return "ENGINE_TEST_POSTGRES_URL is not set"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"engprobe{os.getpid() % 10000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class Relay:
    """Forwards TCP connections made to (address, port) to PostgreSQL on 127.0.0.1, byte for byte."""

    def __init__(self, address: str, port: int, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server((address, port))
        self.server.settimeout(0.2)
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.server.accept()
            except (socket.timeout, OSError):
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        self.server.close()


class Host:
    """A network namespace with a veth link to this machine, and the runner started in it."""

    def __init__(self, number: int, tag: str, folder: Path, database: str, port: int, shared: Path) -> None:
        self.number, self.name = number, f"host{number}"
        self.netns = f"eng{tag}{number}"
        self.outside, self.inside = f"ev{tag}{number}h", f"ev{tag}{number}n"
        self.address = f"10.213.{number}.1"
        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", self.outside, "type", "veth", "peer", "name", self.inside)
        sh("ip", "link", "set", self.inside, "netns", self.netns)
        sh("ip", "addr", "add", f"{self.address}/24", "dev", self.outside)
        sh("ip", "link", "set", self.outside, "up")
        for command in (["ip", "addr", "add", f"10.213.{number}.2/24", "dev", self.inside],
                        ["ip", "link", "set", self.inside, "up"], ["ip", "link", "set", "lo", "up"]):
            sh("ip", "netns", "exec", self.netns, *command)
        self.relay = Relay(self.address, port, ("127.0.0.1", int(POSTGRES_URL.rsplit(":", 1)[1].split("/")[0])))
        url = f"postgresql+psycopg://postgres@{self.address}:{port}/{database}"
        self.config = write_config(folder / self.name, url, {
            "paths": {"inbox": str(shared / "inbox"), "outbox": str(shared / "outbox"),
                      "models": str(shared / "models"), "workflows": str(TEST_WORKFLOWS)},
            "inbox": {"mode": "poll", "poll_seconds": 0.2},
            "runner": {"lease_seconds": LEASE, "heartbeat_seconds": 0.3, "max_attempts": 1000},
            "batching": {"coalesce": False},
        })
        self.log = folder / f"{self.name}.log"
        self.process: subprocess.Popen | None = None
        self.runner_id = f"{self.name}-{tag}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ENGINE_CONFIG": str(self.config)}
        command = (f"hostname {self.name} && exec {sys.executable} -m engine run --quiet "
                   f"--runner-id {self.runner_id}")
        self.process = subprocess.Popen(["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", command],
                                        env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                        cwd=self.config.parent)

    def link(self, up: bool) -> None:
        sh("ip", "link", "set", self.outside, "up" if up else "down")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    def remove(self) -> None:
        self.kill()
        self.relay.close()
        subprocess.run(["ip", "link", "del", self.outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    why = _can_make_namespaces()
    if why:
        pytest.skip(why)
    admin, database, url = _postgres_database()
    shared = tmp_path / "share"
    tag = uuid.uuid4().hex[:4]
    hosts = []
    try:
        hosts = [Host(n, tag, tmp_path, database, _free_port(), shared) for n in (1, 2, 3)]
        yield hosts, url, shared
    finally:
        for host in hosts:
            host.remove()
        _drop(admin, database)


def _store(url: str, shared: Path):
    from engine import app
    from engine.config import load_config

    config = load_config(write_config(shared.parent / "observer", url, {
        "paths": {"inbox": str(shared / "inbox"), "outbox": str(shared / "outbox"), "models": str(shared / "models"),
                  "workflows": str(TEST_WORKFLOWS)}}))
    return config, app.Engine.create(config).store


def _wait(what, timeout: float, every: float = 0.2, state=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"gave up waiting after {timeout} s; {state()}")


def test_three_hosts_share_the_work_survive_a_kill_and_a_cut_link_and_do_everything_once(cluster):
    from sqlalchemy import text

    from engine.domains.catalogue import ModelRegistry
    from engine.domains.tinymodels import build_tiny_sdxl

    hosts, url, shared = cluster
    config, store = _store(url, shared)
    build_tiny_sdxl(shared / "tiny-src")
    ModelRegistry(config.models_dir).add(shared / "tiny-src", "tiny")

    def scalar(sql: str, **params):
        with store.read() as conn:
            return conn.execute(text(sql), params).scalar()

    inbox = config.inbox
    inbox.mkdir(parents=True, exist_ok=True)

    def drop(name: str, job: dict) -> None:  # written elsewhere, renamed in: as a user's copy would land
        (shared / f".{name}").write_text(json.dumps(job))
        os.replace(shared / f".{name}", inbox / name)

    drop("files.json", {"kind": "batch", "workflow": "files3", "items": [{"seed": i} for i in range(700)]})
    for n in range(3):
        drop(f"tiny-{n}.json", {"workflow": "txt2img", "params": {"model": "tiny", "width": 64, "height": 64,
                                                                  "steps": 2, "prompt": f"a lamp {n}", "seed": n}})
    for host in hosts:
        host.start()

    _wait(lambda: scalar("SELECT count(*) FROM steps WHERE status = 'completed'") >= 700, 180)
    assert {r for r in scalar_rows(store, "SELECT DISTINCT runner_id FROM leases")} <= {h.runner_id for h in hosts}
    hosts[1].kill()  # host2's runner dies mid-way: its steps wait for their leases to expire

    # host3 holds a long step when its link is cut: two sessions that sleep for longer than the lease
    for n in range(2):
        drop(f"slow-{n}.json", {"workflow": "sleepy", "priority": 50, "params": {"steps": 40}})  # 4 s each
    held = _wait(lambda: scalar_rows(store, "SELECT l.session_id FROM leases l JOIN steps s ON s.session_id = "
                                            "l.session_id AND s.step_index = l.step_index WHERE s.step_type = 'sleep' "
                                            "AND l.runner_id = :r", r=hosts[2].runner_id), 120, every=0.05)
    hosts[2].link(False)
    cut_at = time.time()
    time.sleep(LEASE * 3)
    hosts[2].link(True)

    def state() -> str:
        return repr({
            "sessions": scalar_rows_pairs(store, "SELECT status, count(*) FROM sessions GROUP BY status"),
            "unfinished": scalar_rows_pairs(store, "SELECT session_id, workflow_id, status, current_step, ready "
                                                   "FROM sessions WHERE status <> 'completed' LIMIT 5"),
            "leases": scalar_rows_pairs(store, "SELECT session_id, step_index, runner_id, expires_at FROM leases"),
            "runners": scalar_rows_pairs(store, "SELECT runner_id, status, last_heartbeat FROM runner_status"),
            "now": time.time()})

    _wait(lambda: scalar("SELECT count(*) FROM sessions WHERE status NOT IN ('completed', 'failed')") == 0
          and scalar("SELECT count(*) FROM sessions") == 705, 120, state=state)
    # host2's in-flight attempt folder, left when it was killed, is swept away by the live runners
    _wait(lambda: not leftovers(config.outbox), 4 * LEASE + 30, state=lambda: leftovers(config.outbox))
    for host in (hosts[0], hosts[2]):
        host.stop()

    assert scalar("SELECT count(*) FROM sessions WHERE status = 'completed'") == 705
    counts = completions(type("install", (), {"store": store})())
    assert set(counts.values()) == {1}, "a step completed twice"
    assert len(counts) == scalar("SELECT count(*) FROM steps WHERE status = 'completed'") >= 700 * 3 + 3 * 3 + 2 * 3

    # the step host3 held while cut off: taken over by another runner, its late result refused
    session_id = held[0]
    claimed = [json.loads(d) for d in scalar_rows(store, "SELECT data FROM events WHERE stream_id = :s AND type = "
                                                         "'step.claimed' ORDER BY event_id", s=session_id)]
    sleep_claims = [c for c in claimed if c["step_index"] == 1]
    history = scalar_rows_pairs(store, "SELECT type, data, created_at FROM events WHERE stream_id = :s ORDER BY event_id",
                                s=session_id)
    assert len(sleep_claims) >= 2, (cut_at, [row[:1] + row[2:] for row in history])
    assert sleep_claims[0]["runner_id"] == hosts[2].runner_id and len(sleep_claims) >= 2
    done = [json.loads(d) for t, d, _ in history if t == "step.completed" and json.loads(d)["step_index"] == 1]
    assert len(done) == 1 and done[0]["attempt"] == sleep_claims[-1]["attempt"]
    host3_log = hosts[2].log.read_text()
    assert "lease was lost" in host3_log, host3_log[-3000:]

    # every file once: each files3 item's three files, each tiny session's image, no attempt leftovers
    outbox = config.outbox
    written = [p for p in outbox.rglob("step-*.txt") if ".attempts" not in p.parts]
    assert len(written) == 2100 and len({p.parent for p in written}) == 700
    assert len([p for p in outbox.rglob("*.png") if ".attempts" not in p.parts and p.name != "contact-sheet.png"]) == 3
    assert leftovers(outbox) == []
    assert sorted(p.name for p in (inbox / "accepted").iterdir()) == sorted(
        ["files.json", "slow-0.json", "slow-1.json"] + [f"tiny-{n}.json" for n in range(3)])
    assert scalar("SELECT count(*) FROM jobs") == 6
    by_host = Counter(json.loads(d)["runner_id"] for d in scalar_rows(store, "SELECT data FROM events WHERE type = "
                                                                             "'step.claimed'"))
    assert set(by_host) == {h.runner_id for h in hosts}, by_host  # every host did work
    runners = dict(scalar_rows_pairs(store, "SELECT runner_id, host FROM runner_status"))
    assert {runners[h.runner_id] for h in hosts} == {"host1", "host2", "host3"}
    assert store.verify() == []
    store.close()


def leftovers(outbox: Path) -> list[Path]:
    attempts = outbox / ".attempts"
    return [p for p in attempts.rglob("*") if p.is_file()] if attempts.exists() else []


def scalar_rows(store, sql: str, **params) -> list:
    from sqlalchemy import text

    with store.read() as conn:
        return [row[0] for row in conn.execute(text(sql), params)]


def scalar_rows_pairs(store, sql: str, **params) -> list:
    from sqlalchemy import text

    with store.read() as conn:
        return [tuple(row) for row in conn.execute(text(sql), params)]
