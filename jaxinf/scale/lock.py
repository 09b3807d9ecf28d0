"""An exclusive, stale-aware lock on an influence store directory.

One job at a time may write a store. The lock is the file
``path/jaxinf-lock.json`` holding its owner's pid, host, process start time
and a random token, created atomically with ``O_CREAT | O_EXCL``. A lock whose
process has died on this host (or whose pid now belongs to another process)
is stale and taken over with a warning; a live one, or one held from another
host, is refused with a message naming its owner.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings

LOCK = "jaxinf-lock.json"
_STALE_UNREADABLE_S = 30.0  # a lock file still unreadable after this long was torn by a kill

__all__ = ["LOCK", "StoreLock", "read_json_dict"]


def read_json_dict(file: str) -> dict | None:
    """The JSON object in ``file``, or ``None`` when it is missing, torn, empty or not an object."""
    try:
        with open(file) as f:
            record = json.load(f)
    except (OSError, ValueError):  # torn or empty: not done
        return None
    return record if isinstance(record, dict) else None


class StoreLock:
    """An exclusive lock on a store: the file ``path/jaxinf-lock.json`` holding the owner's pid, host and time.

    Created atomically (``O_CREAT | O_EXCL``). A lock left by a process that
    has died on this host is stale and taken over with a warning; a live one
    (or one from another host) is refused, naming its owner.
    """

    def __init__(self, path: str):
        self.file = os.path.join(path, LOCK)
        self.owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": time.time(),
            "start": _start_time(os.getpid()),
            "token": uuid.uuid4().hex,
        }
        self.held = False

    def acquire(self) -> None:
        """Take the lock, or raise ``ValueError`` naming the job that holds it."""
        for _ in range(8):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = read_json_dict(self.file)
                stale = self._stale(found)
                if stale is None:
                    raise ValueError(_held_message(self.file, found)) from None
                self._take_over(found, stale)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            self.held = True
            return
        raise ValueError(f"Could not take the lock {self.file}: other jobs keep taking it over; start one job at once.")

    def release(self) -> None:
        """Delete the lock file if it is still this lock's."""
        if self.held and (read_json_dict(self.file) or {}).get("token") == self.owner["token"]:
            os.remove(self.file)
        self.held = False

    def _stale(self, found: dict | None) -> str | None:
        """Why the lock ``found`` is stale, or ``None`` when its owner may be alive."""
        if found is None:  # being written right now, or torn by a kill
            try:
                age = time.time() - os.path.getmtime(self.file)
            except FileNotFoundError:
                return "released"
            return f"unreadable for {age:.0f} s" if age > _STALE_UNREADABLE_S else None
        if found.get("host") != self.owner["host"] or not isinstance(found.get("pid"), int):
            return None  # another host: cannot tell
        pid = found["pid"]
        if not _alive(pid):
            return f"process {pid} on this host has ended"
        start = _start_time(pid)
        if found.get("start") is not None and start is not None and start != found.get("start"):
            return f"process {pid} has ended (its pid is in use by another process)"
        return None

    def _take_over(self, found: dict | None, why: str) -> None:
        """Remove the stale lock ``found``; if it changed meanwhile (another job took it), put it back."""
        aside = f"{self.file}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self.file, aside)
        except FileNotFoundError:
            return
        now = read_json_dict(aside)
        if now != found and now is not None:  # not the lock judged stale: a live job's, restore it
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as f:
                    json.dump(now, f)
            except FileExistsError:
                pass
        elif why != "released":
            warnings.warn(
                f"Taking over the stale lock {self.file} ({why}; it was {found}).", RuntimeWarning, stacklevel=4
            )
        os.remove(aside)


def _held_message(file: str, found: dict | None) -> str:
    if found is None:
        return f"Another job is creating the lock {file} right now; only one job may write a store at a time."
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(found.get("time", 0)))
    return (
        f"The store is in use by another job: process {found.get('pid')} on host {found.get('host')!r} has held "
        f"{file} since {when}. Wait for it to finish, or choose another path; if that job no longer runs "
        "(e.g. on another host), delete the lock file."
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks after boot (Linux), to tell a reused pid; else ``None``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
