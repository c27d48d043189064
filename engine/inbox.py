"""The inbox: job files dropped into a folder are taken exactly once.

A watchdog observer (or a polling observer, for network shares) wakes a scan; a scan also runs at
start and on a timer, so nothing dropped while the engine was down or missed by the OS is lost.
The events creating a session are committed first, then the file is moved to `accepted/`; a crash
in between leaves the file in the inbox, and on restart it is recognised and only moved. Rejected
files go to `rejected/` with `<name>.error.json` beside them. Nothing is ever deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from engine import commands
from engine.errors import EngineError, ValidationError
from engine.intake import Intake
from engine.jobs import parse_job_bytes
from engine.files import atomic_write_json
from engine.outbox import Outbox
from engine.store import Store

log = logging.getLogger("engine.inbox")

SKIPPED_SUFFIXES = (".tmp", ".part", ".partial", ".swp", ".swx", ".crdownload", "~")


@dataclass(frozen=True)
class Outcome:
    file_name: str
    accepted: bool
    target_type: str | None = None
    target_id: str | None = None
    code: str | None = None
    message: str | None = None


def is_candidate(path: Path) -> bool:
    name = path.name
    return (
        not name.startswith((".", "~", "#"))
        and name.lower().endswith(".json")
        and not name.lower().endswith(SKIPPED_SUFFIXES)
        and path.is_file()
    )


def unique_destination(folder: Path, name: str, content_hash: str) -> Path:
    """A free name in folder: the file's own, else with part of its hash, else a counter."""
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = os.path.splitext(name)
    if len(name.encode()) > 200:
        stem = stem.encode()[:150].decode("utf-8", "ignore") + "-" + content_hash[:8]
    candidates = [f"{stem}{suffix}", f"{stem}-{content_hash[:8]}{suffix}"]
    for candidate in candidates:
        if not (folder / candidate).exists():
            return folder / candidate
    counter = 2
    while (folder / f"{stem}-{content_hash[:8]}-{counter}{suffix}").exists():
        counter += 1
    return folder / f"{stem}-{content_hash[:8]}-{counter}{suffix}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Inbox:
    def __init__(self, config, store: Store, intake: Intake | None = None) -> None:
        self.config = config
        self.store = store
        self.intake = intake or Intake(config)
        self.folder = config.inbox
        self.accepted = self.folder / "accepted"
        self.rejected = self.folder / "rejected"
        self.outbox = Outbox(config.outbox)
        settings = config.values["inbox"]
        self.max_bytes = settings["max_file_bytes"]
        self.grace = settings["partial_grace_seconds"]
        self.poll_seconds = settings["poll_seconds"]
        self.mode = settings["mode"]
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer = None
        self.waiting: set[str] = set()  # files still being written

    # taking files ----------------------------------------------------------------------------

    def scan(self) -> list[Outcome]:
        """Take every complete job file now in the inbox, oldest first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        entries = []
        with os.scandir(self.folder) as found:
            for entry in found:
                path = Path(entry.path)
                if is_candidate(path):
                    try:
                        entries.append((entry.stat().st_mtime, entry.name, path))
                    except FileNotFoundError:
                        continue
        outcomes = []
        self.waiting = set()
        for _, _, path in sorted(entries):
            outcome = self.take(path)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def take(self, path: Path) -> Outcome | None:
        """Ingest one file; None when it is still being written (or vanished)."""
        try:
            stat = path.stat()
            raw = path.read_bytes() if stat.st_size <= self.max_bytes else b""
        except (FileNotFoundError, PermissionError):
            return None
        content_hash = hashlib.sha256(raw).hexdigest() if raw else f"size-{stat.st_size}-{stat.st_mtime_ns}"
        source = commands.Source(path.name, content_hash)
        try:
            if stat.st_size > self.max_bytes:
                raise ValidationError(f"the file is {stat.st_size} bytes; at most {self.max_bytes} are taken")
            try:
                job = parse_job_bytes(raw)
            except ValidationError:
                if time.time() - stat.st_mtime < self.grace:
                    self.waiting.add(path.name)
                    return None
                raise
            submitted = commands.submit(self.store, self.intake, job, source)
        except EngineError as error:
            return self._reject(path, source, error)
        self.outbox.finish(self.store, submitted.events)
        self._move(path, self.accepted, content_hash)
        return Outcome(path.name, True, submitted.target_type, submitted.target_id)

    def _reject(self, path: Path, source: commands.Source, error: EngineError) -> Outcome:
        body = error.to_dict()
        body["file"] = path.name
        try:
            commands.record_rejection(self.store, source, body)
        except EngineError:
            log.exception("could not record the rejection of %s", path.name)
        destination = unique_destination(self.rejected, path.name, source.content_hash)
        atomic_write_json(destination.with_name(destination.name + ".error.json"), body)
        self._move(path, self.rejected, source.content_hash, destination)
        log.warning("rejected %s: %s %s", path.name, error.code, error.message)
        return Outcome(path.name, False, code=error.code, message=error.message)

    def _move(self, path: Path, folder: Path, content_hash: str, destination: Path | None = None) -> None:
        """Move a taken file out of the inbox. A hard link then an unlink, not a rename: renaming out
        of a watched folder makes inotify hold back every later event for half a second (the wait for
        a matching IN_MOVED_TO), which would slow the pickup of the next file."""
        if destination is None:
            same_name = folder / path.name
            if same_name.exists() and _sha256(same_name) == content_hash:
                _unlink(path)  # a crash fell between the link and the unlink: finish the move
                return
            destination = unique_destination(folder, path.name, content_hash)
        try:
            os.link(path, destination)
        except FileNotFoundError:
            return
        except OSError:  # no hard links here (some network shares): a plain rename
            try:
                os.replace(path, destination)
            except FileNotFoundError:
                pass
            return
        _unlink(path)

    # watching --------------------------------------------------------------------------------

    def start(self) -> None:
        """Watch the folder (filesystem events or polling) and take files as they arrive."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        inbox = self

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event):
                inbox._wake.set()

        self.folder.mkdir(parents=True, exist_ok=True)
        self._observer = PollingObserver(timeout=self.poll_seconds) if self.mode == "poll" else Observer()
        self._observer.schedule(Wake(), str(self.folder), recursive=False)
        self._observer.start()
        self._thread = threading.Thread(target=self._loop, name="engine-inbox", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.scan()
            except Exception:  # keep watching: one bad moment must not stop the inbox
                log.exception("inbox scan failed")
            self._wake.wait(min(self.poll_seconds, 0.25) if self.waiting else self.poll_seconds)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def idle(self) -> bool:
        """Nothing in the folder waits to be taken."""
        return not any(is_candidate(p) for p in self.folder.iterdir()) if self.folder.is_dir() else True
