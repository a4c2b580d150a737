"""Recovery distillation of a pruned checkpoint (student) against the dense one (teacher) on DeepSpeed ZeRO-3.

    cfg = load_distill_recipe("distill.yaml", ["steps=100"])      # DistillConfig, validated
    summary = distill(cfg)                                        # every rank of the job calls it

One step: the global batch of `batch_size` sequences is split over the ranks and into micro-batches; per
micro-batch the partitioned teacher gives logits under `no_grad`, the partitioned student is trained on
`(1 − lm_loss_weight)·T²·KL(teacher || student) + lm_loss_weight·CE` (`engine.distill.loss`); after the optimizer
step the sparsity masks are re-applied (`engine.distill.keep_masks`). The output is the student's checkpoint format with
the trained weights (`engine.distill.zero.write_gathered`), the per-step log `distill_log.jsonl`, the resolved recipe
`blockprune_distill.yaml` and a summary `distill_report.json`. Recipe keys: docs/distill.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from engine.calibration import load_tokenizer
from engine.config import ConfigError, _build, config_to_dict, config_to_yaml, parse_size, read_recipe

log = logging.getLogger(__name__)

DISTILL_VERSION = 1
RECIPE_FILE = "blockprune_distill.yaml"
LOG_FILE = "distill_log.jsonl"
REPORT_FILE = "distill_report.json"
# Files of the student carried into the output besides the SOURCE_FILES the writer copies (tokenizer, generation).
CARRIED_FILES = ("modeling_blockprune.py", "blockprune_recipe.yaml")


@dataclass
class DistillConfig:
    """The distillation recipe (docs/distill.md documents every key)."""

    student: str
    teacher: str
    output: str
    data: str
    steps: int = 200
    seq_len: int = 1024
    batch_size: int = 8  # global: sequences per optimizer step, over all ranks
    micro_batch: int | None = None  # sequences per forward on one rank (None: batch_size / world, no accumulation)
    samples: int | None = None  # distinct windows drawn from `data` (None: steps * batch_size, capped by the text)
    seed: int = 0
    text_field: str = "text"
    lr: float = 1.0e-4
    lr_schedule: str = "cosine"  # constant | linear | cosine (after the warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr / lr for linear and cosine
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    lm_loss_weight: float = 0.0  # w in (1 - w) * KD + w * LM
    self_data: bool = False  # train on the teacher's continuations of prompts from `data`
    prompt_len: int = 32  # self_data: prompt tokens taken from each window
    gen_temperature: float = 0.0  # self_data: 0 = greedy decoding, > 0 = sampling temperature
    mask_threshold: float = 0.1  # keep exact zeros of tensors with at least this zero fraction (> 1: none)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config
    max_shard_size: str = "5GB"
    overwrite: bool = False
    threads: int | None = None  # torch intra-op threads per rank (None: torch's default, 1 under torchrun)
    progress: bool = True
    log_every: int = 10  # logging.info every this many steps (the JSON log has every step)
    build_shm_op: bool = False  # build DeepSpeed's CPU shared-memory op (tensor-parallel inference only; ~45 s once)
    version: int = DISTILL_VERSION

    SCHEDULES: ClassVar[tuple[str, ...]] = ("constant", "linear", "cosine")

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def validate(self) -> None:
        """Checks that need neither the model nor the world size."""
        for key in ("steps", "seq_len", "batch_size"):
            if getattr(self, key) < (2 if key == "seq_len" else 1):
                raise ConfigError(f"distill.{key} = {getattr(self, key)}: must be >= {2 if key == 'seq_len' else 1}")
        for key in ("micro_batch", "samples", "threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"distill.{key} = {getattr(self, key)}: must be >= 1 (or empty)")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError("distill: lr and temperature must be > 0")
        if not 0.0 <= self.lm_loss_weight <= 1.0:
            raise ConfigError(f"distill.lm_loss_weight = {self.lm_loss_weight}: must be in [0, 1]")
        if self.lr_schedule not in self.SCHEDULES:
            raise ConfigError(f"distill.lr_schedule = {self.lr_schedule!r}: choose from {', '.join(self.SCHEDULES)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"distill.warmup_steps = {self.warmup_steps}: must be in [0, steps)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"distill.min_lr_ratio = {self.min_lr_ratio}: must be in [0, 1]")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.gen_temperature < 0 or self.mask_threshold <= 0:
            raise ConfigError("distill: weight_decay, grad_clip and gen_temperature must be >= 0, mask_threshold > 0")
        if self.self_data and not 1 <= self.prompt_len < self.seq_len:
            raise ConfigError(f"distill.prompt_len = {self.prompt_len}: must be in [1, seq_len) with self_data")
        if self.log_every < 1:
            raise ConfigError("distill.log_every must be >= 1")
        self._validate_deepspeed()
        parse_size(self.max_shard_size)

    def _validate_deepspeed(self) -> None:
        if not isinstance(self.deepspeed, dict):
            raise ConfigError("distill.deepspeed: expected a mapping of DeepSpeed config overrides")
        stage = self.deepspeed.get("zero_stage", (self.deepspeed.get("zero_optimization") or {}).get("stage", 3))
        if stage != 3:
            raise ConfigError(
                f"distill.deepspeed zero stage = {stage!r}: only 3 is supported (the student and "
                "teacher are partitioned at load and the masks address ZeRO-3 partitions)"
            )
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            if key in self.deepspeed:
                raise ConfigError(f"distill.deepspeed.{key}: set batch_size / micro_batch instead")


def distill_config_from_dict(data: dict) -> DistillConfig:
    """Build and validate a DistillConfig from a recipe mapping (unknown keys are errors)."""
    if not isinstance(data, dict):
        raise ConfigError("distill recipe: expected a mapping at the top level")
    for key in ("student", "teacher", "output", "data"):
        if not str(data.get(key) or "").strip():
            raise ConfigError(f"distill recipe: `{key}` is required (a non-empty path)")
    cfg = _build(DistillConfig, {**data, "deepspeed": data.get("deepspeed") or {}}, "distill")
    cfg.validate()
    return cfg


def load_distill_recipe(path: str | Path, overrides: list[str] | None = None) -> DistillConfig:
    """A distill recipe from YAML with `key=value` overrides (as `blockprune run`, e.g. `steps=50`,
    `deepspeed.zero_optimization.stage3_param_persistence_threshold=0`), read by the same loader as run recipes
    (`engine.config.read_recipe`: size-checked, no YAML aliases, plain finite data)."""
    return distill_config_from_dict(read_recipe(path, overrides, what="distill recipe"))


def lr_factor(step: int, cfg: DistillConfig) -> float:
    """Multiplier of `lr` for optimizer step `step` (0-based): `(step+1)/(warmup+1)` during the warmup, then with
    `t = (step − warmup)/(steps − warmup)` and `r = min_lr_ratio`: constant 1; linear `1 − (1−r)·t`; cosine
    `r + (1−r)·½(1 + cos πt)`."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    r = cfg.min_lr_ratio
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - r) * t
    if cfg.lr_schedule == "cosine":
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


# --------------------------------------------------------------------------------------------- checks


def _read_config(path: str, what: str) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise ConfigError(f"distill.{what} = {path}: not a checkpoint directory (no config.json)")
    return json.loads(f.read_text())


def check_same_tokenizer(student: str, teacher: str) -> None:
    """ConfigError unless the two checkpoints tokenize alike: the same token -> id map (and special tokens). A teacher
    with the same `vocab_size` but another tokenizer would give a KL between unrelated distributions over ids."""
    try:
        ts, tt = load_tokenizer(student), load_tokenizer(teacher)
    except (OSError, ValueError) as e:
        raise ConfigError(f"distill: cannot load the student's or the teacher's tokenizer: {e}") from None
    vs, vt = ts.get_vocab(), tt.get_vocab()
    if vs != vt:
        diff = sorted(set(vs.items()) ^ set(vt.items()))[:3]
        raise ConfigError(
            f"distill: the student's and the teacher's tokenizers differ ({len(vs)} vs {len(vt)} tokens; e.g. {diff}); "
            "the KL needs one vocabulary"
        )
    special = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    bad = [k for k in special if getattr(ts, k) != getattr(tt, k)]
    if bad:
        raise ConfigError(f"distill: the tokenizers' special tokens differ: {', '.join(bad)}")


def check_inputs(cfg: DistillConfig, world: int) -> int:
    """Fail before any weight is read: paths, output, vocabularies, batch split. Returns the micro-batch size."""
    student, teacher = _read_config(cfg.student, "student"), _read_config(cfg.teacher, "teacher")
    if student.get("vocab_size") != teacher.get("vocab_size"):
        raise ConfigError(
            f"distill: student vocab_size {student.get('vocab_size')} != teacher vocab_size "
            f"{teacher.get('vocab_size')} (the KL needs the same vocabulary)"
        )
    check_same_tokenizer(cfg.student, cfg.teacher)
    if not Path(cfg.data).expanduser().exists():
        raise ConfigError(f"distill.data = {cfg.data}: not found")
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"distill.output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"distill.output {out} is not empty; pass --overwrite (overwrite=true) to replace it")
    if out.resolve() in (Path(cfg.student).resolve(), Path(cfg.teacher).resolve()):
        raise ConfigError(f"distill.output {out} is the student or teacher directory")
    micro = cfg.micro_batch or max(1, cfg.batch_size // world)
    if cfg.batch_size % (micro * world):
        raise ConfigError(
            f"distill: batch_size {cfg.batch_size} is not a multiple of micro_batch {micro} x {world} rank(s)"
        )
    return micro


# --------------------------------------------------------------------------------------------- the run


@dataclass
class _Job:
    cfg: DistillConfig
    rank: int
    world: int
    micro: int
    windows: torch.Tensor
    engine: Any = None
    teacher: Any = None
    masks: dict = field(default_factory=dict)
    eos_id: int | None = None
    records: list[dict] = field(default_factory=list)


def distill(cfg: DistillConfig) -> dict:
    """Run the distillation on this process's rank (a world of one without torchrun); returns the summary (also
    written to `distill_report.json` by rank 0)."""
    import torch.distributed as dist

    from engine.distill.zero import init_process_group

    t0 = time.perf_counter()
    cfg.validate()
    owned = not dist.is_initialized()  # a caller's own process group is left to the caller
    rank, world = init_process_group(cfg.build_shm_op)
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        micro = check_inputs(cfg, world)
        job = _prepare(cfg, rank, world, micro)
        t_load = time.perf_counter() - t0
        _train(job)
        t_train = time.perf_counter() - t0 - t_load
        summary = _summary(job, t_load, t_train)
        _save(job, summary, t0)
        del job
    finally:
        # Tear the group down here, not at interpreter exit: gloo's threads destroyed during static destruction
        # abort the process ("terminate called without an active exception") after the output was written.
        if owned and dist.is_initialized():
            dist.destroy_process_group()
    return summary


def _prepare(cfg: DistillConfig, rank: int, world: int, micro: int) -> _Job:
    """Tokenizer and windows, both models partitioned, the DeepSpeed engines, the masks."""
    import deepspeed

    from engine.distill.data import training_windows
    from engine.distill.keep_masks import record_masks
    from engine.distill.zero import load_partitioned, student_ds_config, teacher_ds_config, zero3_loading

    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.student)
    windows = training_windows(
        cfg.data, cfg.seq_len, cfg.samples or cfg.steps * cfg.batch_size, cfg.seed, tok, cfg.text_field
    )
    ds_cfg = student_ds_config(
        batch_size=cfg.batch_size,
        micro_batch=micro,
        world=world,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        overrides=cfg.deepspeed,
    )
    with zero3_loading(ds_cfg):
        student = load_partitioned(cfg.student)
        teacher = load_partitioned(cfg.teacher)
    log.debug("distill: data and partitioned models ready after %.1f s", time.perf_counter() - t0)
    student.config.use_cache = False
    student.train()
    scheduler = None
    if "scheduler" not in ds_cfg:  # a scheduler in the overrides replaces the recipe's lr_schedule
        scheduler = _scheduler_factory(cfg)
    engine, *_ = deepspeed.initialize(
        model=student, model_parameters=[p for p in student.parameters()], config=ds_cfg, lr_scheduler=scheduler
    )
    teacher_engine, *_ = deepspeed.initialize(model=teacher, config=teacher_ds_config(ds_cfg, world))
    teacher_engine.eval()
    log.debug("distill: DeepSpeed engines ready after %.1f s", time.perf_counter() - t0)
    job = _Job(cfg, rank, world, micro, windows, engine, teacher_engine, eos_id=tok.eos_token_id)
    job.masks = record_masks(engine.module, cfg.mask_threshold)
    log.info(
        "distill: %d rank(s), %d x %d tokens per step (micro-batch %d, %d accumulation step(s)), %d steps",
        world,
        cfg.batch_size,
        cfg.seq_len,
        micro,
        ds_cfg["gradient_accumulation_steps"],
        cfg.steps,
    )
    return job


def _scheduler_factory(cfg: DistillConfig):
    """DeepSpeed scheduler callable: a LambdaLR on the wrapped torch optimizer with `lr_factor`."""

    def make(optimizer):
        inner = getattr(optimizer, "optimizer", optimizer)
        return torch.optim.lr_scheduler.LambdaLR(inner, lambda s: lr_factor(s, cfg))

    return make


def _train(job: _Job) -> None:
    from tqdm.auto import tqdm

    from engine.distill.data import rank_micro_batches, step_indices

    cfg = job.cfg
    bar = tqdm(
        range(cfg.steps), desc="distill", unit="step", dynamic_ncols=True, disable=not (cfg.progress and job.rank == 0)
    )
    for step in bar:
        idx = step_indices(job.windows.shape[0], cfg.batch_size, step, cfg.seed)
        rec = _step(job, step, rank_micro_batches(idx, job.rank, job.world, job.micro))
        job.records.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.info(
                "step %d/%d: loss %.4f, kd %.4f, lr %.3g, %.0f tokens/s",
                step + 1,
                cfg.steps,
                rec["loss"],
                rec["kd"],
                rec["lr"],
                rec["tokens_per_s"],
            )
    bar.close()


def _step(job: _Job, step: int, micro_batches: list[torch.Tensor]) -> dict:
    """One optimizer step over this rank's micro-batches; returns the step's log record (averaged over ranks)."""
    import torch.distributed as dist

    from engine.distill.keep_masks import apply_masks
    from engine.distill.loss import distill_loss

    cfg, engine = job.cfg, job.engine
    t0 = time.perf_counter()
    teacher_s = gen_s = 0.0
    sums = torch.zeros(4, dtype=torch.float64)  # loss·tokens, kd·tokens, lm·tokens, tokens
    lr = engine.get_lr()[0]
    for mb in micro_batches:
        ids, valid, g = _batch(job, job.windows[mb])
        gen_s += g
        ids = ids.to(engine.device)
        t1 = time.perf_counter()
        with torch.no_grad():
            teacher_logits = job.teacher(input_ids=ids).logits
        teacher_s += time.perf_counter() - t1
        student_logits = engine(input_ids=ids).logits
        loss, parts = distill_loss(
            student_logits,
            teacher_logits,
            ids,
            temperature=cfg.temperature,
            lm_loss_weight=cfg.lm_loss_weight,
            valid=None if valid is None else valid.to(ids.device),
        )
        engine.backward(loss)
        engine.step()
        n = float(ids[:, 1:].numel() if valid is None else valid.sum())
        sums += torch.tensor(
            [float(loss.detach()) * n, parts["kd"] * n, parts.get("lm", 0.0) * n, n], dtype=torch.float64
        )
        del teacher_logits, student_logits, loss
    apply_masks(job.masks)
    dist.all_reduce(sums)
    wall = time.perf_counter() - t0
    tokens = float(sums[3])
    rec = {
        "step": step + 1,
        "loss": float(sums[0]) / tokens,
        "kd": float(sums[1]) / tokens,
        "lr": lr,
        "tokens": int(tokens),
        "step_s": round(wall, 4),
        "tokens_per_s": round(tokens / wall, 1),
        "teacher_s": round(teacher_s, 4),
    }
    if cfg.lm_loss_weight > 0:
        rec["lm"] = float(sums[2]) / tokens
    if cfg.self_data:
        rec["generate_s"] = round(gen_s, 4)
    return rec


def _batch(job: _Job, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """`(ids, valid, generation seconds)`: the windows themselves, or with self_data the teacher's continuations."""
    if not job.cfg.self_data:
        return windows, None, 0.0
    from engine.distill.data import self_data_batch

    t = time.perf_counter()
    ids, valid = self_data_batch(
        job.teacher.module,
        windows.to(job.engine.device),
        job.cfg.prompt_len,
        job.cfg.gen_temperature,
        job.eos_id,
        synced=job.world > 1,
    )
    return ids, valid, time.perf_counter() - t


# --------------------------------------------------------------------------------------------- output


def _summary(job: _Job, t_load: float, t_train: float) -> dict:
    from engine import memory

    recs = job.records
    head = recs[: max(1, len(recs) // 10)]
    tail = recs[-max(1, len(recs) // 10) :]
    return {
        "student": job.cfg.student,
        "teacher": job.cfg.teacher,
        "output": job.cfg.output,
        "rank": job.rank,
        "world_size": job.world,
        "steps": len(recs),
        "windows": int(job.windows.shape[0]),
        "tokens": sum(r["tokens"] for r in recs),
        "loss_first": recs[0]["loss"],
        "loss_last": recs[-1]["loss"],
        "loss_first_10pct": sum(r["loss"] for r in head) / len(head),
        "loss_last_10pct": sum(r["loss"] for r in tail) / len(tail),
        "teacher_share": round(sum(r["teacher_s"] for r in recs) / max(1e-9, sum(r["step_s"] for r in recs)), 4),
        "masked_tensors": len(job.masks),
        "masked_zeros": sum(m.zeros for m in job.masks.values()),
        "load_s": round(t_load, 2),
        "train_s": round(t_train, 2),
        "tokens_per_s": round(sum(r["tokens"] for r in recs) / max(1e-9, t_train), 1),
        "peak_rss_mb_rank0": round(memory.peak_rss_mb(), 1),
    }


def _save(job: _Job, summary: dict, t0: float) -> None:
    """Gather and write the checkpoint (rank 0 writes), then the config, carried files, log, recipe and summary."""
    import torch.distributed as dist

    from engine.distill.zero import write_gathered
    from sharding.writer import CheckpointWriter

    cfg = job.cfg
    t_save = time.perf_counter()
    writer = None
    if job.rank == 0:
        writer = CheckpointWriter(
            cfg.output,
            max_shard_size=parse_size(cfg.max_shard_size),
            overwrite=cfg.overwrite,
            protected={cfg.student: "the student model", cfg.teacher: "the teacher model", cfg.data: "the data"},
        )
    write_gathered(job.engine.module, cfg.student, writer, job.rank)
    if job.rank == 0:
        summary["save_s"] = round(time.perf_counter() - t_save, 2)
        summary["wall_time_s"] = round(time.perf_counter() - t0, 2)
        student = Path(cfg.student)
        extra = {name: (student / name).read_bytes() for name in CARRIED_FILES if (student / name).is_file()}
        extra[RECIPE_FILE] = config_to_yaml(cfg)
        extra[LOG_FILE] = "".join(json.dumps(r) + "\n" for r in job.records)
        extra[REPORT_FILE] = json.dumps(summary, indent=2) + "\n"
        config = json.loads((student / "config.json").read_text())
        writer.finalize(config, source_dir=student, extra_files=extra)
        log.info(
            "distill: wrote %s (loss %.4f -> %.4f, %.1f s)",
            cfg.output,
            summary["loss_first"],
            summary["loss_last"],
            summary["wall_time_s"],
        )
    dist.barrier()
