"""One run per output at a time (issue 16, item 6): blockprune.lock.

Two processes on one output (the second refuses naming the first, the first finishes right); stale locks taken over
only when certain (dead pid, reused pid, reboot, this process); another host's lock and an unreadable lock refused
with the way out; the lock's life cycle in one process (finalize, close, garbage collection, a newer writer)."""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sharding.lock import LOCK_FORMAT, LOCK_NAME, OutputLock, _boot_id, _proc_start
from sharding.writer import INDEX_NAME, MANIFEST_NAME, CheckpointWriter, WriterError

REPO = Path(__file__).resolve().parents[1]
RUN_ID = "lock"


def units(n: int = 3) -> list[tuple[str, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    return [(f"u{i}.", {f"u{i}.w": torch.randn(8, 8, generator=g)}) for i in range(n)]


def plant_lock(out: Path, **fields) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "format": LOCK_FORMAT,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": "2025-01-01T00:00:00+00:00",
        "boot_id": _boot_id(),
        "proc_start": _proc_start(os.getpid()),
        "token": "0" * 32,
        **fields,
    }
    (out / LOCK_NAME).write_text(json.dumps(info))
    return info


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


_HOLDER = """
import sys, time
from pathlib import Path
from sharding.writer import CheckpointWriter
from tests.test_safety_lock import units

out, go = Path(sys.argv[1]), Path(sys.argv[2])
w = CheckpointWriter(out, run_id="lock", resume=True)
us = units()
w.write_unit(*us[0])
print("holding", flush=True)
deadline = time.time() + 60
while not go.exists() and time.time() < deadline:
    time.sleep(0.01)
for u in us[1:]:
    w.write_unit(*u)
w.finalize({"model_type": "llama"})
print("done", flush=True)
"""


def test_second_run_refuses_naming_the_holder_and_first_finishes(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out), str(go)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "holding", proc.stderr.read()[-2000:]
        for kwargs in ({"resume": True}, {"overwrite": True}, {"resume": True, "overwrite": True}):
            with pytest.raises(WriterError, match=rf"in use by another blockprune run: pid {proc.pid} on host ") as e:
                CheckpointWriter(out, run_id=RUN_ID, **kwargs)
            assert f"If that run is dead, delete {out / LOCK_NAME}" in str(e.value)
        go.write_text("")
        out_s, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out_s.strip() == "done", err[-2000:]
    assert not (out / LOCK_NAME).exists()
    index = json.loads((out / INDEX_NAME).read_text())
    assert sorted(index["weight_map"]) == ["u0.w", "u1.w", "u2.w"]
    assert json.loads((out / MANIFEST_NAME).read_text())["finalized"] is True


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    pid = dead_pid()
    plant_lock(out, pid=pid, proc_start=None)
    with caplog.at_level(logging.WARNING, logger="sharding.lock"):
        w = CheckpointWriter(out, run_id=RUN_ID)
    assert f"pid {pid} no longer exists" in caplog.text and "took over a stale lock" in caplog.text
    held = json.loads((out / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["token"] == w._lock.token
    w.close()
    assert not (out / LOCK_NAME).exists()


def test_reused_pid_and_reboot_are_stale(tmp_path, caplog):
    ppid = os.getppid()  # alive; planted with another start time: the pid was reused
    plant_lock(tmp_path / "a", pid=ppid, proc_start=(_proc_start(ppid) or 0) + 1)
    with caplog.at_level(logging.WARNING, logger="sharding.lock"):
        CheckpointWriter(tmp_path / "a").close()
    assert "now belongs to another process" in caplog.text or _proc_start(ppid) is None
    if _boot_id() is not None:
        plant_lock(tmp_path / "b", pid=ppid, boot_id="another-boot")
        with caplog.at_level(logging.WARNING, logger="sharding.lock"):
            CheckpointWriter(tmp_path / "b").close()
        assert "before this machine rebooted" in caplog.text


def test_live_pid_on_this_host_is_refused(tmp_path):
    ppid = os.getppid()
    plant_lock(tmp_path / "out", pid=ppid, proc_start=_proc_start(ppid))
    with pytest.raises(WriterError, match=rf"pid {ppid} on host {socket.gethostname()} since 2025"):
        CheckpointWriter(tmp_path / "out")
    assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == ppid  # untouched


def test_lock_of_another_host_is_refused_even_with_a_dead_pid(tmp_path):
    out = tmp_path / "out"
    plant_lock(out, pid=dead_pid(), host="node-elsewhere-17")
    before = (out / LOCK_NAME).read_bytes()
    with pytest.raises(WriterError) as e:
        CheckpointWriter(out, resume=True)
    msg = str(e.value)
    assert "host node-elsewhere-17" in msg and "another host: its pid cannot be checked from here" in msg
    assert f"If that run is dead, delete {out / LOCK_NAME}" in msg
    assert (out / LOCK_NAME).read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"garbage", b'{"format": "other"}', b"[1]"])
def test_unreadable_lock_is_refused(tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_bytes(content)
    with pytest.raises(WriterError, match=rf"is locked: .*{LOCK_NAME} exists but is .*delete"):
        CheckpointWriter(out)
    assert (out / LOCK_NAME).read_bytes() == content


def test_lock_life_cycle_in_one_process(tmp_path):
    out = tmp_path / "out"
    us = units()
    w = CheckpointWriter(out, run_id=RUN_ID)
    assert (out / LOCK_NAME).is_file()
    w.write_unit(*us[0])
    # a newer writer object of this process takes the lock over; the older one can no longer write
    w2 = CheckpointWriter(out, run_id=RUN_ID, resume=True)
    with pytest.raises(WriterError, match="no longer locked by this writer: another writer in this process"):
        w.write_unit(*us[1])
    w.close()  # does not remove the newer writer's lock
    assert json.loads((out / LOCK_NAME).read_text())["token"] == w2._lock.token
    w2.write_unit(*us[1])
    w2.finalize({})
    assert not (out / LOCK_NAME).exists()
    w2.finalize({})  # idempotent: takes the lock again for the rewrite and releases it
    assert not (out / LOCK_NAME).exists()
    w2.close()
    with pytest.raises(WriterError, match="closed"):
        w2.finalize({})


def test_lock_released_by_garbage_collection_and_context_manager(tmp_path):
    out = tmp_path / "out"
    w = CheckpointWriter(out, run_id=RUN_ID)
    del w
    gc.collect()
    assert not (out / LOCK_NAME).exists()
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, run_id=RUN_ID, resume=True) as w:
            w.write_unit(*units(1)[0])
            raise RuntimeError("the engine failed")
    assert not (out / LOCK_NAME).exists()


def test_refusals_leave_no_lock_and_foreign_dirs_untouched(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("x")
    os.chmod(foreign, 0o555)
    try:
        with pytest.raises(WriterError, match="not a blockprune output"):  # refused before any write attempt
            CheckpointWriter(foreign)
    finally:
        os.chmod(foreign, 0o755)
    assert sorted(p.name for p in foreign.iterdir()) == ["a.txt"]
    out = tmp_path / "out"
    CheckpointWriter(out, run_id="a").close()
    with pytest.raises(WriterError, match="different recipe"):
        CheckpointWriter(out, run_id="b", resume=True)
    assert not (out / LOCK_NAME).exists()


def test_racing_takeovers_of_one_stale_lock(tmp_path):
    """Many locks judging the same stale file at once: exactly one ends up holding it."""
    out = tmp_path / "out"
    plant_lock(out, pid=dead_pid(), proc_start=None)
    script = (  # sharding/lock.py loaded alone (no torch import): the four start within milliseconds
        "import importlib.util, sys, time\n"
        "spec = importlib.util.spec_from_file_location('lk', sys.argv[3])\n"
        "lk = importlib.util.module_from_spec(spec); spec.loader.exec_module(lk)\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\nlock = lk.OutputLock(sys.argv[1])\n"
        "try:\n    lock.acquire()\n    print('won', flush=True)\n    time.sleep(1.5)\n    lock.release()\n"
        "except lk.LockError:\n    print('lost', flush=True)\n"
    )
    start = time.time() + 1.0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(out), str(start), str(REPO / "sharding" / "lock.py")],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert results == ["lost", "lost", "lost", "won"]
    assert not (out / LOCK_NAME).exists()
    assert sorted(p.name for p in out.iterdir()) == []  # no temporaries left


def test_output_lock_alone(tmp_path):
    lock = OutputLock(tmp_path)
    lock.acquire()
    lock.acquire()  # re-entrant for its holder
    assert lock.read_holder()["token"] == lock.token
    lock.release()
    lock.release()
    assert lock.read_holder() is None


def test_slow_breaker_never_removes_a_fresh_lock(tmp_path):
    """The interleaving a race can produce, made deterministic: A judges the lock stale, B takes it over first;
    A's removal must then leave B's fresh lock alone. While another breaker holds the guard, A waits."""
    out = tmp_path / "out"
    plant_lock(out, pid=dead_pid(), proc_start=None)
    a = OutputLock(out)
    judged = a.read_holder()
    b = OutputLock(out)
    b.acquire()
    assert a._remove_stale(judged) is True
    assert a.read_holder()["token"] == b.token
    (out / f"{LOCK_NAME}.break").write_text("")  # another breaker at work
    assert a._remove_stale(b.read_holder()) is False
    assert a.read_holder()["token"] == b.token
    b.release()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_never_releases_the_parents_lock(tmp_path):
    w = CheckpointWriter(tmp_path / "out", run_id=RUN_ID)
    pid = os.fork()
    if pid == 0:  # the child: what its exit hooks would do
        try:
            w.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["token"] == w._lock.token
    w.close()
    assert not (tmp_path / "out" / LOCK_NAME).exists()
