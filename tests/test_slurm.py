"""A real single-node Slurm (Debian's slurmctld + slurmd + munge, started by `launch/slurm/local_cluster.sh`) running
`blockprune submit` as 2 gloo tasks on a tiny llama:

- `submit --nodes 1 --tasks 2 --wait` writes the same bytes as `run --nproc 2` (torchrun): docs/distributed.md
  promises identical bytes for the same recipe, world size and thread count (`runtime.threads: 1` in both);
- preemption (`scancel --signal=USR2`, what Slurm sends before a timeout or on preemption) mid-run: submitit's
  checkpoint requeues the job, the test releases the requeue's 2-minute BeginTime (`scontrol update StartTime=now`),
  the new attempt resumes from the manifest and ends byte-identical;
- `scontrol requeue` (SIGTERM to every task): the tasks exit at once (launch.submit.exit_on_sigterm) instead of
  running on until KillWait's SIGKILL; Slurm requeues, the new attempt resumes, byte-identical.

Marked `slurm`; skipped with the reason when not root or Slurm is not installed (`.ci/run` installs it with apt when
it can). The cluster is started once for the module and stopped by its pid files at teardown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_distributed import output_digests, write_recipe
from tests.tiny_models import build_tiny_checkpoint, recipe, tiny_text

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm" / "local_cluster.sh"
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged", "mungekey")
KILL_WAIT_S = 30  # local_cluster.sh's KillWait: a task that ignores SIGTERM runs this long after a requeue


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd runs the jobs)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (
            f"Slurm is not installed (missing {', '.join(missing)}): "
            "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
        )
    return None


@pytest.fixture(scope="module")
def cluster():
    """Start the cluster (state in a short /tmp path: munge's socket path must stay under 108 bytes); yield the
    environment for clients; stop the daemons by their pid files."""
    reason = _unavailable()
    if reason:
        print(f"skipping the slurm tests: {reason}")
        pytest.skip(reason)
    state = Path(tempfile.mkdtemp(prefix="bp-slurm-", dir="/tmp"))
    p = subprocess.run([str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    conf = p.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
    assert Path(conf).is_file(), p.stdout
    cpus = subprocess.run(
        ["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, env={**os.environ, "SLURM_CONF": conf}
    ).stdout.strip()
    if cpus != "" and int(cpus) < 2:
        subprocess.run([str(SCRIPT), "stop", str(state)], timeout=120, check=False)
        pytest.skip(f"the 2-task jobs need a node with 2 CPUs; this one has {cpus}")
    env = {
        **os.environ,
        "SLURM_CONF": conf,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    try:
        yield env
    finally:
        subprocess.run([str(SCRIPT), "stop", str(state)], timeout=120, check=False)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def setup(cluster, tmp_path_factory):
    """A 16-block llama wide enough (hidden 256) that a 2-task run takes a few seconds, so a signal lands mid-run;
    and the plain reference: `blockprune run --nproc 2` (torchrun, 2 gloo ranks)."""
    d = tmp_path_factory.mktemp("slurm_runs")
    src = build_tiny_checkpoint(
        "llama", d / "src", num_hidden_layers=16, hidden_size=256, intermediate_size=512, max_shard_size="200KB"
    )
    calib = d / "calib.txt"
    calib.write_text(tiny_text(20000, seed=0))
    base = recipe(src, d / "plain", calib, [{"method": "sparsegpt", "sparsity": 0.5}])
    base["calibration"].update(samples=16, seq_len=64)
    base["runtime"]["threads"] = 1  # same thread count in every run: docs/distributed.md, "Determinism"
    p = _cli(cluster, "run", str(write_recipe(d / "plain.yaml", base)), "--nproc", "2")
    assert p.returncode == 0, p.stderr[-4000:]
    return d, base


def _cli(env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout
    )


def _slurm(env: dict, *args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=60, check=True).stdout


def _job_state(env: dict, job: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ...)."""
    out = _slurm(env, "scontrol", "show", "job", job)
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))


def _submit(env: dict, rec: Path, *extra: str) -> tuple[str, subprocess.CompletedProcess]:
    try:
        p = _cli(env, "submit", str(rec), "--nodes", "1", "--tasks", "2", *extra, timeout=240)
    except subprocess.TimeoutExpired:
        raise AssertionError("submit timed out; the queue:\n" + _slurm(env, "squeue", "-o", "%i %T %r")) from None
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    m = re.search(r"submitted job (\d+)", p.stdout)
    assert m, p.stdout
    return m.group(1), p


def _units(out: Path) -> int:
    try:
        return len(json.loads((out / "blockprune_manifest.json").read_text())["units"])
    except (OSError, ValueError, KeyError):
        return 0


def _wait(cond, what: str, timeout: float, step: float = 0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _interrupt_mid_run(env: dict, rec: Path, out: Path, interrupt: list[str]) -> tuple[str, float]:
    """Submit, wait for 4 committed units (non-block + 3 blocks of 16), run `interrupt` (+ the job id), wait until
    Slurm has requeued the job (PENDING), release its BeginTime and wait for the end. Returns (job id, seconds from
    the interrupt until the job was pending again)."""
    job, _ = _submit(env, rec)
    _wait(lambda: _units(out) >= 4 or _job_state(env, job)["JobState"] in ("COMPLETED", "FAILED"), "4 units", 240)
    assert _job_state(env, job)["JobState"] == "RUNNING", "the run ended before it could be interrupted"
    t0 = time.time()
    _slurm(env, *interrupt, job)
    _wait(lambda: _job_state(env, job)["JobState"] == "PENDING", "the requeued job", 120, step=0.2)
    requeued_after = time.time() - t0
    _slurm(env, "scontrol", "update", f"JobId={job}", "StartTime=now")  # else it waits ~2 min (BeginTime)
    state = _wait(
        lambda: (s := _job_state(env, job))["JobState"] in ("COMPLETED", "FAILED", "CANCELLED") and s, "the end", 300
    )
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", state
    return job, requeued_after


def _job_logs(folder: Path, job: str) -> str:
    return "".join(f.read_text(errors="replace") for f in sorted(folder.glob(f"{job}_*_log.*")))


def _assert_resumed_identical(out: Path, plain: Path) -> None:
    report = json.loads((out / "blockprune_report.json").read_text())
    resumed = [b.get("resumed", False) for b in report["blocks"]]
    assert any(resumed) and not all(resumed), f"expected a mid-run resume, got resumed flags {resumed}"
    assert output_digests(out) == output_digests(plain)


def test_submit_wait_equals_plain_run(cluster, setup):
    d, base = setup
    rec = write_recipe(d / "wait.yaml", {**base, "output": str(d / "wait")})
    t0 = time.time()
    job, p = _submit(cluster, rec, "--wait")
    print(f"submit --wait: {time.time() - t0:.1f} s")
    assert f"job {job} done" in p.stdout and '"world_size": 2' in p.stdout, p.stdout
    assert output_digests(d / "wait") == output_digests(d / "plain")


def test_usr2_preemption_requeues_and_resumes_byte_identical(cluster, setup):
    d, base = setup
    out = d / "usr2"
    rec = write_recipe(d / "usr2.yaml", {**base, "output": str(out)})
    job, requeued_after = _interrupt_mid_run(cluster, rec, out, ["scancel", "--signal=USR2"])
    print(f"USR2: pending again after {requeued_after:.1f} s")
    logs = _job_logs(Path(f"{out}.submitit"), job)
    assert "preempted or timed out: requeueing" in logs and "resuming" in logs, logs[-4000:]
    _assert_resumed_identical(out, d / "plain")


def test_scontrol_requeue_sigterm_exits_promptly_and_resumes(cluster, setup):
    d, base = setup
    out = d / "sigterm"
    rec = write_recipe(d / "sigterm.yaml", {**base, "output": str(out)})
    job, requeued_after = _interrupt_mid_run(cluster, rec, out, ["scontrol", "requeue"])
    print(f"scontrol requeue: pending again after {requeued_after:.1f} s (KillWait {KILL_WAIT_S} s)")
    logs = _job_logs(Path(f"{out}.submitit"), job)
    assert logs.count("SIGTERM: exiting now") == 2, logs[-4000:]  # both tasks, at once
    assert requeued_after < KILL_WAIT_S / 2, f"the tasks ran on for {requeued_after:.1f} s after SIGTERM"
    _assert_resumed_identical(out, d / "plain")
