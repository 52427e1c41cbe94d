"""One writer per results folder: <folder>/.lock names the process that writes there.

    with RunLock(out_dir):
        ...train, write checkpoints...

A second run into the same folder is refused while the first is alive; the lock of a process that
died (killed, crashed, machine rebooted) is taken over with a note. A process on another host
cannot be checked from here, so its lock is respected until it is deleted by hand.
"""
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import UserError

_FRESH = 2.0        # seconds: an empty lock file younger than this is still being written
_MAX_PID = 2 ** 22  # Linux's largest pid_max (4194304); a larger recorded pid is no process's


def _proc_start(pid):
    """The start time of a process in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(owner):
    """True if the owner recorded in a lock file is (or may be) still running."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:     # exists, belongs to another user
        pass
    recorded, current = owner.get("proc_start"), _proc_start(pid)
    return recorded is None or current is None or recorded == current


class RunLock:
    """Exclusive right to write into a results folder, held as <folder>/.lock (pid, host, time)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.record = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        pid = os.getpid()
        record = {"pid": pid, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "proc_start": _proc_start(pid)}
        for _ in range(10):                 # a few rounds against processes taking over at once
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as err:
                raise UserError(f"cannot create the lock file {self.path}: {err.strerror or err}") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
            self.record = record
            return self
        raise UserError(f"cannot take the lock {self.path}: other processes keep replacing it; "
                        f"use another --results_dir")

    def _read(self):
        """(owner recorded in the lock file or {} if unreadable, its text); None if the file is gone."""
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as err:
            raise UserError(f"cannot read the lock file {self.path}: {err.strerror or err}") from None
        try:
            owner = json.loads(text)
            pid = owner.get("pid") if isinstance(owner, dict) else None
            if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid <= _MAX_PID:
                return owner, text
            if isinstance(pid, int):        # written whole, but no process can have this pid: corrupt
                return {}, text
        except ValueError:
            pass
        if age < _FRESH:                    # its writer may be between open() and write()
            time.sleep(_FRESH - age)
            return self._read()
        return {}, text

    def _take_over_if_stale(self):
        """Refuse if the lock's owner is alive; otherwise remove the lock so acquire() retries."""
        found = self._read()
        if found is None:
            return
        owner, text = found
        if owner and _alive(owner):
            where = "" if owner.get("host") == socket.gethostname() else f" on {owner.get('host')}"
            raise UserError(f"{self.folder} is being written by process {owner['pid']}{where} (started "
                            f"{owner.get('started', '?')}); wait for it to finish, or use another "
                            f"--results_dir")
        # Move the stale file aside and check it is the one judged stale: another process may
        # have taken it over and written its own lock in between; that one is put back.
        aside = self.path.with_name(f".lock.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != text:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        who = f"process {owner['pid']}" if owner else "an unknown process (unreadable lock file)"
        print(f"note: took over the stale lock of {who} in {self.folder}", file=sys.stderr)

    def release(self):
        """Remove the lock file, if it is still ours."""
        if self.record is None:
            return
        try:
            if json.loads(self.path.read_text()) == self.record:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.record = None
