"""`blockprune submit`: run a pruning recipe as a Slurm job (or a local multi-process job) through submitit.

    blockprune submit RECIPE.yaml --nodes 2 --gpus-per-node 8 --partition gpu --time 240
    blockprune submit RECIPE.yaml --local --tasks 2          # same job on this machine (submitit LocalExecutor)

One task per GPU (`tasks_per_node = gpus_per_node`); every task exports the torch.distributed environment with
`submitit.helpers.TorchDistributedEnvironment` (rank 0's host is the rendezvous) and runs `engine.pipeline.run`,
which joins the process group (NCCL on GPUs, gloo on CPUs). On timeout or preemption Slurm sends the job USR2;
submitit calls `PruneJob.checkpoint`, which requeues the same job; the requeued job resumes from the output's
manifest (block-level resume), so no committed block is recomputed and the final checkpoint is byte-identical.

SIGTERM (`scontrol requeue`, preemption with `PreemptMode=REQUEUE`, the time limit, `scancel`) makes every task exit
at once (`SystemExit`, see `exit_on_sigterm`); submitit alone ignores it, so the job ran on until Slurm's KillWait
SIGKILL. Whether the job comes back is Slurm's decision (it does after a requeue or a preemption); a new attempt
resumes from the manifest.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# After an exception in a multi-task Slurm job, wait this long before reporting it: when a peer task exited on
# SIGTERM or USR2, our own SIGTERM is usually on its way, and an exit by signal must not be recorded as a failure.
PEER_EXIT_GRACE_S = 5.0


def _log_signal(signum: int, frame: Any) -> None:
    log.warning("%s while exiting: ignored", signal.Signals(signum).name)


def _exit_now(signum: int, frame: Any) -> None:
    signal.signal(signum, _log_signal)  # a second SIGTERM must not interrupt the unwinding (writer cleanup, atexit)
    log.warning(
        "%s: exiting now; committed blocks are kept and a requeued attempt resumes from the manifest",
        signal.Signals(signum).name,
    )
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """Make SIGTERM end this task promptly.

    Slurm sends SIGTERM, then SIGKILL after `KillWait` (30 s by default), on `scontrol requeue`, on preemption in
    REQUEUE/CANCEL mode, at the time limit and on `scancel`. submitit installs a handler that only logs it ("Bypassing
    signal SIGTERM"), so the job went on working for KillWait seconds and was then killed wherever it was. Here the
    task raises `SystemExit` instead: it unwinds through the writer's cleanup (an uncommitted unit's temporary file is
    removed; committed units stay in the manifest), and submitit, which catches only `Exception`, writes no "error"
    result, so a job that Slurm requeues is not reported as failed. The next attempt resumes from the manifest.
    """
    signal.signal(signal.SIGTERM, _exit_now)


@dataclass
class PruneJob:
    """The submitit callable: one task of a (multi-task) pruning job. Picklable; `checkpoint` makes it requeue."""

    recipe: str
    overrides: list[str] = field(default_factory=list)
    attempt: int = 0

    def __call__(self) -> dict[str, Any]:
        import submitit

        from engine.config import load_recipe
        from engine.pipeline import run
        from sharding import dist

        env = submitit.JobEnvironment()
        exit_on_sigterm()  # after submitit's own handlers, which only log SIGTERM
        # A result left by an earlier attempt of this task (e.g. the error of a task whose peer was preempted) is
        # stale now; without this, a client polling for results could read it once this attempt's rank 0 finishes.
        env.paths.result_pickle.unlink(missing_ok=True)
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        logging.basicConfig(
            level=logging.INFO if env.global_rank == 0 else logging.WARNING,
            format=f"%(asctime)s rank{env.global_rank} %(name)s: %(message)s",
        )
        cfg = load_recipe(self.recipe, self.overrides)
        cfg.resume = True  # a requeued attempt continues from the manifest; a first attempt starts an empty output
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        log.info(
            "job %s attempt %d (Slurm restarts %d): task %d/%d",
            env.job_id,
            self.attempt,
            restarts,
            env.global_rank,
            env.num_tasks,
        )
        try:
            report = run(cfg)
        except Exception:
            if env.num_tasks > 1 and env.cluster == "slurm":
                # A peer that exited on SIGTERM/USR2 breaks our collectives; if our own SIGTERM is on its way (Slurm
                # signals every task), it raises SystemExit during this sleep and the task is not recorded as failed.
                time.sleep(PEER_EXIT_GRACE_S)
            raise
        dist.shutdown(dist.DistInfo(world_size=env.num_tasks))
        summary = {
            k: report.get(k)
            for k in ("model", "run_id", "world_size", "wall_time_s", "peak_rss_mb", "pruned_linear_sparsity")
        }
        return {**summary, "output": cfg.output, "attempt": self.attempt, "slurm_restarts": restarts}

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on USR2 (timeout or preemption): requeue the same job; resume does the rest."""
        import submitit

        # submitit now runs `scontrol requeue` (Slurm answers with SIGTERM) and exits: let that exit finish.
        signal.signal(signal.SIGTERM, _log_signal)
        log.warning(
            "preempted or timed out: requeueing (attempt %d); the run resumes from its manifest", self.attempt + 1
        )
        return submitit.helpers.DelayedSubmission(PruneJob(self.recipe, list(self.overrides), self.attempt + 1))


@dataclass
class SubmitOptions:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks: int = 1  # local: number of processes; Slurm CPU jobs: tasks per node
    partition: str | None = None
    time_min: int = 240
    account: str | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    local: bool = False
    logs: str | None = None  # submitit folder (job scripts, pickles, stdout/stderr); default <output>.submitit
    max_requeues: int = 3


def make_executor(opts: SubmitOptions, folder: Path):
    """A submitit LocalExecutor (`--local`) or AutoExecutor (Slurm when `sbatch` exists) with the options set."""
    import submitit

    tasks = opts.tasks if opts.local or not opts.gpus_per_node else opts.gpus_per_node
    if opts.local:
        ex = submitit.LocalExecutor(folder=str(folder), max_num_timeout=opts.max_requeues)
        ex.update_parameters(tasks_per_node=tasks, nodes=1, timeout_min=opts.time_min)
        return ex
    auto = submitit.AutoExecutor(folder=str(folder), max_num_timeout=opts.max_requeues)
    params: dict[str, Any] = {
        "nodes": opts.nodes,
        "tasks_per_node": tasks,
        "timeout_min": opts.time_min,
        "name": "blockprune",
    }
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    if opts.partition:
        params["slurm_partition"] = opts.partition
    if opts.account:
        params["slurm_account"] = opts.account
    auto.update_parameters(**params)
    return auto


def submit(recipe: str, overrides: list[str], opts: SubmitOptions):
    """Validate the recipe (no weights read), submit the job and return the submitit Job."""
    from engine.config import load_recipe
    from engine.pipeline import check_output

    cfg = load_recipe(recipe, overrides)  # fails here, before anything is queued
    check_output(cfg)
    folder = Path(opts.logs or f"{cfg.output.rstrip('/')}.submitit")
    ex = make_executor(opts, folder)
    job = ex.submit(PruneJob(os.path.abspath(recipe), list(overrides)))
    log.info("submitted job %s (%s); logs in %s", job.job_id, "local" if opts.local else ex.cluster, folder)
    return job
