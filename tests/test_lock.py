"""One writer per results folder: utils/lock.py."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.errors import UserError
from utils.lock import RunLock

ROOT = Path(__file__).resolve().parent.parent


def write_lock(folder, **record):
    path = Path(folder) / ".lock"
    path.write_text(json.dumps(record))
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


def test_lock_held_in_process(tmp_path):
    with RunLock(tmp_path) as lock:
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(UserError) as err:
            RunLock(tmp_path).acquire()
        assert str(err.value) == (f"{tmp_path} is being written by process {os.getpid()} (started "
                                  f"{record['started']}); wait for it to finish, or use another --results_dir")
        assert lock.record == record
    assert not (tmp_path / ".lock").exists()


def test_lock_of_another_live_process_then_taken_over_when_it_dies(tmp_path, capsys):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from utils.lock import RunLock; "
            "RunLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as err:
            RunLock(tmp_path).acquire()
        assert str(err.value).startswith(f"{tmp_path} is being written by process {child.pid} (started ")
        assert str(err.value).endswith("); wait for it to finish, or use another --results_dir")
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    lock = RunLock(tmp_path).acquire()
    assert capsys.readouterr().err == f"note: took over the stale lock of process {child.pid} in {tmp_path}\n"
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_corrupt_reused_and_foreign_locks(tmp_path, capsys):
    for text in ("", "not json", '{"pid": -1}'):
        (tmp_path / ".lock").write_text(text)
        os.utime(tmp_path / ".lock", (time.time() - 60, time.time() - 60))
        RunLock(tmp_path).acquire().release()
        assert capsys.readouterr().err == (f"note: took over the stale lock of an unknown process (unreadable "
                                           f"lock file) in {tmp_path}\n")
    # our own pid, reused: the recorded process start time differs
    write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), started="then", proc_start=-5)
    RunLock(tmp_path).acquire().release()
    assert f"took over the stale lock of process {os.getpid()}" in capsys.readouterr().err
    # another host cannot be checked from here: respected
    write_lock(tmp_path, pid=1, host="elsewhere", started="2024-01-01 00:00:00")
    with pytest.raises(UserError, match=r"being written by process 1 on elsewhere \(started 2024-01-01"):
        RunLock(tmp_path).acquire()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock(tmp_path).acquire()
    path = write_lock(tmp_path, pid=1, host="elsewhere", started="now")
    lock.release()
    assert path.exists()
