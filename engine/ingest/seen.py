"""What a file in the inbox is: its bytes, read safely, and what identifies that very file.

A file is read without following symlinks and without blocking (a FIFO named `x.json` must not
hang the runner). Its *identity* is a digest of its name, inode, size, modification and change
times and content hash: the same file seen again (by another runner, or after a crash between the
commit and the move) has the same identity; a new file with the same name and bytes (written
anew, copied, or moved back) has another, because its inode or change time differ. The device
number is left out, so hosts that mount one shared folder agree on the identity.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat as stat_module
from dataclasses import dataclass
from pathlib import Path


def display_name(name: str) -> str:
    """A file name as text that any database and log can hold: bytes that are not UTF-8 are
    shown as backslash escapes (`\\xff`), the rest as it is."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class SeenFile:
    path: Path
    stat: os.stat_result
    raw: bytes | None  # None: not read (too big, not a regular file, unreadable)
    problem: str | None  # why it cannot be a job whatever it holds (then `code` says which)
    code: str | None = None

    @property
    def name(self) -> str:
        return display_name(self.path.name)

    @property
    def content_hash(self) -> str:
        if self.raw is None:
            return f"unread-{self.stat.st_size}-{self.stat.st_mtime_ns}"
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def identity(self) -> str:
        s = self.stat
        key = f"{os.fsencode(self.path.name).hex()}:{s.st_ino}:{s.st_size}:{s.st_mtime_ns}:{s.st_ctime_ns}:{self.content_hash}"
        return hashlib.sha256(key.encode()).hexdigest()[:40]

    @property
    def stat_key(self) -> tuple:
        """What can be known without reading the file; equal for the same unchanged file."""
        s = self.stat
        return (self.path.name, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)


def refusal(seen: SeenFile):
    """The error a file is refused with whatever it holds (a symlink, a FIFO, too big), or None."""
    from engine.errors import UnsafePath, ValidationError

    if not seen.problem:
        return None
    error_type = UnsafePath if seen.code == "UNSAFE_PATH" else ValidationError
    return error_type(f"{seen.name}: {seen.problem}")


def look_at(path: Path, max_bytes: int) -> SeenFile:
    """Stat and read a job file. FileNotFoundError when it is gone; anything else is described."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        status = os.lstat(path)  # FileNotFoundError goes up: it is gone
        if stat_module.S_ISLNK(status.st_mode) or exc.errno == errno.ELOOP:
            return SeenFile(path, status, None, "a symbolic link: job files must be regular files", "UNSAFE_PATH")
        return SeenFile(path, status, None, f"cannot be read: {exc.strerror or exc}")
    try:
        status = os.fstat(fd)
        if not stat_module.S_ISREG(status.st_mode):
            return SeenFile(path, status, None, "not a regular file (a FIFO, socket or device?)")
        if status.st_size > max_bytes:
            return SeenFile(path, status, None, f"the file is {status.st_size} bytes; at most {max_bytes} are taken")
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except OSError as exc:
                return SeenFile(path, status, None, f"cannot be read: {exc.strerror or exc}")
            if not chunk:
                break
            chunks.append(chunk)
            if sum(map(len, chunks)) > max_bytes:
                return SeenFile(path, status, None, f"the file grew past {max_bytes} bytes while being read")
        return SeenFile(path, os.fstat(fd), b"".join(chunks), None)
    finally:
        os.close(fd)
