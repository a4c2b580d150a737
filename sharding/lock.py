"""An advisory lock that gives one run at a time an output directory: ``<out_dir>/blockprune.lock``.

Two runs writing the same output would interleave their manifests (the second "resumes" the first's units while
the first is still writing them). The lock file names its holder, as JSON::

    {"format": "blockprune-lock", "pid": 4242, "host": "node17", "started": "2025-01-01T12:00:00+00:00",
     "boot_id": "...", "proc_start": 123456, "token": "<uuid4 hex>"}

Creation is atomic and refuses an existing lock: the content is written to a private temporary file and hard-linked
to the lock name (``link`` fails if the name exists, atomically, also on NFS, where ``O_EXCL`` was historically
unreliable; filesystems without hard links fall back to ``O_CREAT | O_EXCL``). So a lock file is never seen
half-written when links work.

A lock found in place is *stale*, and is taken over with a warning, only when that is certain:

- same host (``socket.gethostname()``) and the holder's pid no longer exists, or the machine rebooted since
  (``/proc/sys/kernel/random/boot_id`` differs), or the pid now belongs to a process started at another time
  (``/proc/<pid>/stat`` start time differs: the pid was reused);
- same process: the lock was left by a writer object of this process that no longer holds it (an interrupted open
  or release), or is held by a live writer object of this process, which then loses it (its next write refuses).

A stale lock is removed under a short-lived ``blockprune.lock.break`` file (``O_EXCL``), after re-reading that it
still is the stale one, so of several processes taking it over at once exactly one wins and the others see the
winner's lock. A lock from another host is never taken over: pids there mean nothing here, and on a shared
filesystem that run may be alive. The error names the holder and says how to remove the lock if that run is dead.
An unreadable lock file is refused the same way. Release removes the file only if it still holds our token.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sharding.errors import BlockpruneError

logger = logging.getLogger(__name__)

LOCK_NAME = "blockprune.lock"
LOCK_FORMAT = "blockprune-lock"
_TMP_SUFFIX = ".tmp"
_BREAK_SUFFIX = ".break"
_TAKEOVER_SECONDS = 10.0  # how long acquire keeps retrying while other processes race for a stale lock
_BREAK_STALE_SECONDS = 30.0

# token -> OutputLock, for the locks held by live objects of this process (in-process takeover, see module doc)
_HELD: dict[str, OutputLock] = {}
_HELD_GUARD = threading.Lock()


class LockError(BlockpruneError, RuntimeError):
    """The output directory is locked by another run (the message names it) or the lock cannot be taken."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after its closing parenthesis
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True  # unknown: assume alive
    return True


def describe_holder(info: dict[str, Any]) -> str:
    """``pid 4242 on host node17 since 2025-01-01T12:00:00+00:00``."""
    return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}"


class OutputLock:
    """The lock of one output directory, held by one writer object. `acquire` takes it or raises LockError."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.held = False
        self.lost_to: str | None = None  # set when another object of this process took the lock over
        self._pid = os.getpid()  # a forked child inherits this object: only the acquiring process releases

    # ---- public -----------------------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Create the lock file, taking over a stale one (with a warning); LockError if another run holds it."""
        if self.held:
            return
        deadline = time.monotonic() + _TAKEOVER_SECONDS
        while time.monotonic() < deadline:
            if self._create():
                self._register()
                self._remove_old_temporaries()
                return
            holder = self.read_holder()
            if holder is None:
                continue  # vanished between our attempt and the read: try again
            why = self._stale_reason(holder)
            if why is None:
                raise LockError(self._held_message(holder))
            if self._remove_stale(holder):
                logger.warning("output %s: took over a stale lock (%s): %s", self.out_dir, describe_holder(holder), why)
            else:
                time.sleep(0.01)  # another process is breaking the same stale lock
        raise LockError(f"could not lock output {self.out_dir}: {self.path} keeps changing (another run starting?)")

    def release(self) -> None:
        """Remove the lock file if it is still ours. Safe to call twice; never raises for a vanished file. In a
        forked child (which inherited this object and its exit hooks) it does nothing: the parent holds the lock."""
        if os.getpid() != self._pid:
            return
        with _HELD_GUARD:
            _HELD.pop(self.token, None)
        if not self.held:
            return
        self.held = False
        holder = self.read_holder()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        elif holder is not None:
            logger.warning("output %s: lock now held by %s, left in place", self.out_dir, describe_holder(holder))

    def check(self) -> None:
        """LockError if this object no longer holds the lock (another writer of this process took it over)."""
        if not self.held:
            why = f"another writer in this process took it over ({self.lost_to})" if self.lost_to else "released"
            raise LockError(f"output {self.out_dir} is no longer locked by this writer: {why}")

    def read_holder(self) -> dict[str, Any] | None:
        """The lock file's content; None if there is no lock file. An unreadable one gives ``{"unreadable": ...}``."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            return {"unreadable": f"cannot read it ({e.strerror or e})"}
        try:
            info = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return {"unreadable": f"not a {LOCK_FORMAT} file ({len(raw)} bytes)"}
        if not isinstance(info, dict) or info.get("format") != LOCK_FORMAT:
            return {"unreadable": f"not a {LOCK_FORMAT} file"}
        return info

    # ---- creation ---------------------------------------------------------------------------------------------

    def _content(self) -> bytes:
        info = {
            "format": LOCK_FORMAT,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "boot_id": _boot_id(),
            "proc_start": _proc_start(os.getpid()),
            "token": self.token,
        }
        return (json.dumps(info, indent=2) + "\n").encode()

    def _create(self) -> bool:
        """True if we created the lock file; False if one exists. Interrupt-safe: a file we may have created is
        removed again if we are interrupted before `held` is set."""
        tmp = self.out_dir / f"{LOCK_NAME}.{self.token}{_TMP_SUFFIX}"
        data = self._content()
        try:
            tmp.write_bytes(data)
            try:
                os.link(tmp, self.path)
                created = True
            except (FileExistsError, FileNotFoundError):  # exists; or our temporary was removed as a stray
                created = False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                created = self._create_excl(data)
            if created:
                self.held, self._pid = True, os.getpid()
            return created
        except BaseException:
            if not self.held:
                self._unlink_if_ours()
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def _create_excl(self, data: bytes) -> bool:
        """Fallback for filesystems without hard links: O_CREAT | O_EXCL, then the content."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return True

    def _unlink_if_ours(self) -> None:
        holder = self.read_holder()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def _remove_old_temporaries(self) -> None:
        """Temporaries of acquirers killed between writing and removing them (one lives microseconds)."""
        for p in self.out_dir.glob(f"{LOCK_NAME}.*{_TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                if time.time() - p.stat().st_mtime > _BREAK_STALE_SECONDS:
                    p.unlink()

    def _register(self) -> None:
        with _HELD_GUARD:
            _HELD[self.token] = self

    # ---- stale locks ------------------------------------------------------------------------------------------

    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the lock described by `holder` is certainly stale, or None if its holder may be alive."""
        if "unreadable" in holder or not isinstance(holder.get("pid"), int):
            return None
        if holder.get("host") != socket.gethostname():
            return None
        pid = holder["pid"]
        if pid == os.getpid():
            with _HELD_GUARD:
                owner = _HELD.get(str(holder.get("token")))
            if owner is None:
                return "left by this process, by a writer that no longer holds it"
            owner.held, owner.lost_to = False, f"a newer writer of {self.out_dir}"
            with _HELD_GUARD:
                _HELD.pop(owner.token, None)
            return "held by an older writer object of this process, which loses it"
        boot = _boot_id()
        if boot is not None and holder.get("boot_id") not in (None, boot):
            return f"pid {pid} ran before this machine rebooted"
        if not _pid_exists(pid):
            return f"pid {pid} no longer exists"
        start = _proc_start(pid)
        if start is not None and holder.get("proc_start") is not None and start != holder["proc_start"]:
            return f"pid {pid} now belongs to another process (started at another time)"
        return None

    def _remove_stale(self, holder: dict[str, Any]) -> bool:
        """Remove the stale lock file if it still is the one we judged (same token). Breakers serialise on a
        ``blockprune.lock.break`` file (O_EXCL): without it, of two processes breaking one stale lock, the slower
        could remove the fresh lock the faster had just created. Returns False if another breaker is at work."""
        guard = self.out_dir / f"{LOCK_NAME}{_BREAK_SUFFIX}"
        try:
            os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            with contextlib.suppress(OSError):  # a breaker killed mid-way (microseconds) leaves an old guard
                if time.time() - guard.stat().st_mtime > _BREAK_STALE_SECONDS:
                    guard.unlink()
            return False
        try:
            current = self.read_holder()
            if current is not None and current.get("token") == holder.get("token"):
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)
        return True

    def _held_message(self, holder: dict[str, Any]) -> str:
        if "unreadable" in holder:
            return (
                f"output {self.out_dir} is locked: {self.path} exists but is {holder['unreadable']}; if no run is "
                f"writing there, delete {self.path}"
            )
        same_host = holder.get("host") == socket.gethostname()
        where = "" if same_host else " (another host: its pid cannot be checked from here)"
        return (
            f"output {self.out_dir} is in use by another blockprune run: {describe_holder(holder)}{where}; "
            f"wait for it to finish or use another output. If that run is dead, delete {self.path}"
        )
