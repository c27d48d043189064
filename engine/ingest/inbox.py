"""The inbox: job files dropped into a folder are taken exactly once, whatever they hold.

A watchdog observer (or a polling observer, for network shares) wakes a scan; a scan also runs at
start and on a timer, so nothing dropped while the engine was down or missed by the OS is lost.
The events creating a session are committed first, then the file is moved to `accepted/`; a crash
in between leaves the file in the inbox, and on restart it is recognised by its identity
(engine.ingest.seen) and only moved. Several runners may watch one folder: the one whose transaction
records a file's identity first takes it; the others see it taken and only help move it.

Whatever goes wrong with one file is that file's problem: it is rejected (moved to `rejected/`
with `<name>.error.json` beside it) or, when it cannot even be moved, recorded as stranded
(`job.stranded`, `jobs.move_error`) and skipped. The scan never stops at a file. Nothing is
ever deleted. Files in subfolders, files not named `*.json`, dotfiles and editor or download
temporaries are not job files and are left alone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from engine import commands, metrics, queries
from engine.errors import EngineError, ValidationError
from engine.files import atomic_write_json
from engine.ingest.seen import SeenFile, display_name, look_at, refusal
from engine.ingest.jobs import parse_job_bytes
from engine.outage import Outage
from engine.store import STORE_ERRORS, Store

log = logging.getLogger("engine.inbox")

SKIPPED_SUFFIXES = (".tmp", ".part", ".partial", ".swp", ".swx", ".crdownload", "~")
RETRY_STRANDED_SECONDS = 30.0  # how often a file that could not be moved is tried again, quietly
GIVE_UP_AFTER = 5  # failures of one file (not its content's fault) before it is rejected anyway


@dataclass(frozen=True)
class Outcome:
    file_name: str
    accepted: bool
    target_type: str | None = None
    target_id: str | None = None
    code: str | None = None
    message: str | None = None


def is_job_name(name: str) -> bool:
    shown = display_name(name).lower()
    return (not shown.startswith((".", "~", "#")) and shown.endswith(".json")
            and not shown.endswith(SKIPPED_SUFFIXES))


def unique_destination(folder: Path, name: str, content_hash: str) -> Path:
    """A free name in folder: the file's own, else with part of its hash, else a counter."""
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = os.path.splitext(name)
    if len(name.encode()) > 200:
        stem = stem.encode()[:150].decode("utf-8", "ignore") + "-" + content_hash[:8]
    candidates = [f"{stem}{suffix}", f"{stem}-{content_hash[:8]}{suffix}"]
    for candidate in candidates:
        if not os.path.lexists(folder / candidate):
            return folder / candidate
    counter = 2
    while os.path.lexists(folder / f"{stem}-{content_hash[:8]}-{counter}{suffix}"):
        counter += 1
    return folder / f"{stem}-{content_hash[:8]}-{counter}{suffix}"


def _holds_job_files(folder: str) -> bool:
    """Whether a subfolder of the inbox holds files named like jobs (dropped one level too deep)."""
    try:
        with os.scandir(folder) as entries:
            return any(is_job_name(entry.name) for entry in entries)
    except OSError:
        return False


def _unchanged(seen: SeenFile) -> bool:
    """The file is still in the inbox, the same inode with the same contents' size and time."""
    try:
        now = os.lstat(seen.path)
    except OSError:
        return False
    return (now.st_ino, now.st_size, now.st_mtime_ns) == (seen.stat.st_ino, seen.stat.st_size, seen.stat.st_mtime_ns)


def _same_inode(a: Path, b: Path) -> bool:
    first, second = os.lstat(a), os.lstat(b)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


class Inbox:
    def __init__(self, engine) -> None:
        """`engine`: the installation (engine.app.Engine) whose intake and store files go to."""
        config = engine.config
        self.config = config
        self.store: Store = engine.store
        self.intake = engine.intake
        self.folder = config.inbox
        self.accepted = self.folder / "accepted"
        self.rejected = self.folder / "rejected"
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
        self._stranded: dict[tuple, float] = {}  # stat key -> when to try moving it again
        self._failures: dict[tuple, int] = {}  # stat key -> failed attempts to take it
        self._noted: set[str] = set()  # names of things not taken, said once
        self._store_trouble = Outage(log, "taking inbox files (the database)")
        self._scan_trouble = Outage(log, "scanning the inbox")

    # taking files ----------------------------------------------------------------------------

    def candidates(self) -> list[Path]:
        """The job files in the folder now, oldest first (not subfolders, not other names)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        found = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                try:
                    if is_job_name(entry.name) and not entry.is_dir(follow_symlinks=False):
                        found.append((entry.stat(follow_symlinks=False).st_mtime, entry.name, Path(entry.path)))
                    else:
                        self._note_ignored(entry)
                except OSError:
                    continue
        return [path for _, _, path in sorted(found)]

    def _note_ignored(self, entry: os.DirEntry) -> None:
        """Say once why a file or folder in the inbox is not taken (hidden and temporary names,
        and the inbox's own accepted/ and rejected/, quietly)."""
        name = display_name(entry.name)
        if name in self._noted or name in ("accepted", "rejected") or name.startswith((".", "~", "#")) \
                or name.lower().endswith(SKIPPED_SUFFIXES):
            return
        self._noted.add(name)
        if entry.is_dir(follow_symlinks=False):
            if _holds_job_files(entry.path):  # a folder of input images, as docs/jobs.md suggests, is no news
                log.info("not taking the folder %s: job files are taken from the inbox itself, not from subfolders "
                         "(a subfolder may hold input images)", name)
        else:
            log.info("not taking %s: only files ending in .json are jobs", name)

    def scan(self) -> list[Outcome]:
        """Take every complete job file now in the inbox; one file's trouble never stops the rest."""
        outcomes = []
        self.waiting = set()
        store_failed = False
        for path in self.candidates():
            try:
                outcome = self.take(path)
            except Exception as exc:  # not the file's content: the database, the disk, a bug
                store_failed = store_failed or isinstance(exc, STORE_ERRORS)
                outcome = self._failed(path, exc)
            if outcome is not None:
                outcomes.append(outcome)
        if not store_failed:
            self._store_trouble.ok()
        return outcomes

    def take(self, path: Path) -> Outcome | None:
        """Ingest one file; None when it is still being written, gone, or was taken already."""
        try:
            seen = look_at(path, self.max_bytes)
        except FileNotFoundError:
            return None
        if self._stranded.get(seen.stat_key, 0.0) > time.monotonic():
            return None
        known = self._known(seen)
        if known is not None:  # this very file was taken: before a crash, or by another runner
            self._finish(seen, known)
            return None
        refused = refusal(seen)
        if refused is not None:
            return self._reject(seen, refused)
        try:
            job = parse_job_bytes(seen.raw, self.intake.limits)
        except ValidationError as error:
            if 0 <= time.time() - seen.stat.st_mtime < self.grace:  # a time in the future (clock skew) is not recent
                self.waiting.add(path.name)
                return None
            return self._reject(seen, error)
        destination = unique_destination(self.accepted, seen.name, seen.content_hash)
        source = commands.Source(seen.name, seen.content_hash, seen.identity, destination.name, seen.stat.st_ino)
        try:
            submitted = commands.submit(self.store, self.intake, job, source, lambda: _unchanged(seen))
        except STORE_ERRORS:
            raise  # the database's trouble, not the file's: taken again at the next scan
        except EngineError as error:
            return self._reject(seen, error)
        except Exception as exc:  # something in the file that validation did not foresee
            log.exception("taking %s failed", seen.name)
            return self._reject(seen, ValidationError(f"this job could not be read: {type(exc).__name__}: {exc}"))
        if submitted.already:
            self._finish(seen, self._known(seen))
            return None
        self._move(seen, destination, source.file_key, None)
        metrics.INBOX.labels(outcome="accepted").inc()
        if submitted.target_type == "control":
            log.info("accepted %s: %s %s", seen.name, job.action, submitted.target_id)
        else:
            log.info("accepted %s (job %s) as %s %s", seen.name, job.job_id or "without an id", submitted.target_type,
                     submitted.target_id)
        return Outcome(seen.name, True, submitted.target_type, submitted.target_id)

    def _known(self, seen: SeenFile) -> dict | None:
        """The jobs row of this very file, if it was taken. Two changes of a taken file's change
        time are recognised too: a crash between the link and the unlink of its move (its inode
        already sits at its destination), and a stranded file whose flags or permissions were
        changed so that it can be moved (the same inode, recorded with its ingest)."""
        row, rows = queries.files_taken(self.store, seen.identity, seen.content_hash, seen.name)
        if row is not None:
            return row
        for row in rows:
            destination = self._folder_of(row) / row["stored_as"]
            try:
                if _same_inode(seen.path, destination):
                    return dict(row)
            except OSError:
                pass
            if row["move_error"] and self._ingested_inode(row["job_key"]) == seen.stat.st_ino:
                return dict(row)
        return None

    def _ingested_inode(self, job_key: str) -> int | None:
        for event in self.store.stream("job", job_key):
            if event.type in ("job.received", "job.rejected"):
                return event.data.get("file_inode")
        return None

    def _folder_of(self, row: dict) -> Path:
        return self.accepted if row["status"] == "accepted" else self.rejected

    def _finish(self, seen: SeenFile, row: dict | None) -> None:
        """Complete what the ingest of a taken file left undone: the error file, the move."""
        if row is None or not row.get("stored_as"):
            return
        destination = self._folder_of(row) / row["stored_as"]
        if row["status"] == "rejected":
            error_file = destination.with_name(destination.name + ".error.json")
            if not error_file.exists():
                self._write_error(error_file, self._rejection_of(row))
        self._move(seen, destination, row["job_key"], row.get("move_error"))

    def _rejection_of(self, row: dict) -> dict:
        for event in reversed(self.store.stream("job", row["job_key"])):
            if event.type == "job.rejected":
                return event.data.get("error") or {"code": row["error_code"], "message": row["error_message"]}
        return {"code": row["error_code"], "message": row["error_message"], "details": []}

    def _reject(self, seen: SeenFile, error: EngineError) -> Outcome | None:
        destination = unique_destination(self.rejected, seen.name, seen.content_hash)
        body = {**error.to_dict(), "file": seen.name}
        source = commands.Source(seen.name, seen.content_hash, seen.identity, destination.name, seen.stat.st_ino)
        if not commands.record_rejection(self.store, source, body):
            self._finish(seen, self._known(seen))  # another runner rejected this very file just now
            return None
        self._write_error(destination.with_name(destination.name + ".error.json"), body)
        self._move(seen, destination, source.file_key, None)
        log.warning("rejected %s: %s %s", seen.name, error.code, error.message)
        metrics.INBOX.labels(outcome="rejected").inc()
        return Outcome(seen.name, False, code=error.code, message=error.message)

    def _write_error(self, path: Path, body: dict) -> None:
        try:
            atomic_write_json(path, body)
        except OSError as exc:
            log.warning("could not write %s: %s", display_name(path.name), exc)

    def _move(self, seen: SeenFile, destination: Path, job_key: str, recorded_error: str | None) -> None:
        """Move a taken file out of the inbox: a hard link then an unlink, not a rename, because
        renaming out of a watched folder makes inotify hold back every later event for half a
        second. Safe to repeat, and safe when another runner moves the same file at once. A file
        that cannot be moved is recorded once as stranded and tried again now and then."""
        path = seen.path
        if not _unchanged(seen):
            return  # moved already, or another file was dropped under its name since (taken on its own)
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, destination, follow_symlinks=False)
            except FileNotFoundError:
                return  # moved already (another runner)
            except FileExistsError:
                try:
                    same = _same_inode(path, destination)
                except FileNotFoundError:
                    return  # another runner linked it there and unlinked it here between our two looks
                if not same:
                    raise OSError(f"{display_name(destination.name)} already holds another file") from None
            except (OSError, NotImplementedError):  # no hard links (some network shares; Windows cannot
                # link without following links): a plain rename
                if os.path.lexists(destination):
                    raise
                os.rename(path, destination)
                self._stranded.pop(seen.stat_key, None)
                return
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            self._stranded.pop(seen.stat_key, None)
        except OSError as exc:
            self._stranded[seen.stat_key] = time.monotonic() + RETRY_STRANDED_SECONDS
            if recorded_error is None:
                message = f"could not be moved out of the inbox: {exc.strerror or exc}; it stays there and is skipped"
                log.warning("%s %s", seen.name, message)
                commands.record_stranded(self.store, job_key, seen.name, message)
                metrics.INBOX.labels(outcome="stranded").inc()

    def _failed(self, path: Path, exc: Exception) -> Outcome | None:
        """Taking a file raised something that is not a verdict on its content. The database's or
        the disk's trouble (unreachable, full, read-only) never counts against a file: it waits in
        the inbox until the store can be written, and the log says so in a few lines. Anything else
        is logged; after a few tries the file is rejected anyway, so one file can never hold the
        scan hostage."""
        if isinstance(exc, STORE_ERRORS):
            self._store_trouble.failed(exc, traceback=False)
            return None
        try:
            seen = look_at(path, self.max_bytes)
        except OSError:
            return None
        count = self._failures.get(seen.stat_key, 0) + 1
        self._failures[seen.stat_key] = count
        log.error("could not take %s (try %d): %s: %s", seen.name, count, type(exc).__name__, exc)
        if count < GIVE_UP_AFTER:
            return None
        try:
            outcome = self._reject(seen, ValidationError(
                f"{seen.name} could not be taken ({type(exc).__name__}: {exc})"))
        except Exception:
            log.exception("could not reject %s either", seen.name)
            return None
        self._failures.pop(seen.stat_key, None)
        return outcome

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
                self._scan_trouble.ok()
            except Exception as exc:  # keep watching: one bad moment must not stop the inbox
                self._scan_trouble.failed(exc)
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
        """Nothing in the folder waits to be taken (files that could not be moved do not count)."""
        for path in self.candidates():
            try:
                status = os.lstat(path)
            except OSError:
                continue
            key = (path.name, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
            if key not in self._stranded:
                return False
        return True
