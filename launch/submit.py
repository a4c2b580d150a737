"""`blockprune submit`: run a pruning recipe as a Slurm job (or a local multi-process job) through submitit.

    blockprune submit RECIPE.yaml --nodes 2 --gpus-per-node 8 --partition gpu --time 240
    blockprune submit RECIPE.yaml --local --tasks 2          # same job on this machine (submitit LocalExecutor)

One task per GPU (`tasks_per_node = gpus_per_node`); every task exports the torch.distributed environment with
`submitit.helpers.TorchDistributedEnvironment` (rank 0's host is the rendezvous) and runs `engine.pipeline.run`,
which joins the process group (NCCL on GPUs, gloo on CPUs). On timeout or preemption Slurm sends the job USR2;
submitit calls `PruneJob.checkpoint`, which requeues the same job; the requeued job resumes from the output's
manifest (block-level resume), so no committed block is recomputed and the final checkpoint is byte-identical.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        logging.basicConfig(
            level=logging.INFO if env.global_rank == 0 else logging.WARNING,
            format=f"%(asctime)s rank{env.global_rank} %(name)s: %(message)s",
        )
        cfg = load_recipe(self.recipe, self.overrides)
        cfg.resume = True  # a requeued attempt continues from the manifest; a first attempt starts an empty output
        log.info("job %s attempt %d: task %d/%d", env.job_id, self.attempt, env.global_rank, env.num_tasks)
        report = run(cfg)
        dist.shutdown(dist.DistInfo(world_size=env.num_tasks))
        summary = {
            k: report.get(k)
            for k in ("model", "run_id", "world_size", "wall_time_s", "peak_rss_mb", "pruned_linear_sparsity")
        }
        return {**summary, "output": cfg.output, "attempt": self.attempt}

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on USR2 (timeout or preemption): requeue the same job; resume does the rest."""
        import submitit

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
    ex = submitit.AutoExecutor(folder=str(folder), max_num_timeout=opts.max_requeues)
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
    ex.update_parameters(**params)
    return ex


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
