"""The block loop (DESIGN.md §2): one transformer block on the device at a time, stage-agnostic.

    reader -> stages (setup: every check that needs the model's shapes, before any write) -> budget
           -> [one scoring pass, when a stage or the budget must see the whole model first]
           -> embed(ids) -> for each block not removed:
                  read, build -> dense forward (the stages' statistics; dense outputs kept as the reference)
                  -> each stage applies itself (engine/stages/) -> the pruned block forwarded (sequential) -> write
           -> finalize (config from the written layer shapes, tokenizer files, recipe, report; the index last)

The loop knows the `engine.stage.BlockStage` protocol and nothing of any method: what a stage needs, does and
changes in the output are the stage's answers. Dense blocks whose stages all mask weights of linears in place
(`linear_wise`) take the one-pass true-sequential path (`engine.sequential`) when their pieces compose to the
block's forward and the held intermediates fit.

Nothing here holds more than one block's weights, its input statistics and the calibration activations.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from engine import memory
from engine import sequential as seq_mod
from engine.arch import ArchAdapter, LinearSpec, adapter_for
from engine.budget import SCORES_FILE, Budget, make_budget
from engine.cache import ActivationCache
from engine.calibration import load_calibration, load_tokenizer
from engine.config import ConfigError, RunConfig, config_to_yaml, parse_size
from engine.dense_pass import BlockBuilder, BlockRunner, StatsCollector, check_finite, free_block, stats_to
from engine.distributed import RankWriter, run_sharded
from engine.export import MODELING_FILE, kept_layers, nonuniform_config, output_config
from engine.fp8 import source_reader
from engine.memory_plan import MemoryPlan, plan_for_run
from engine.model_check import check_reader
from engine.overlap import BlockIO
from engine.prepass import scoring_pass
from engine.reconstruct import DenseIntermediate, needs_intermediate, reconstruct_block, reconstruct_config
from engine.report.llmc_recipe import llmc_recipe_yaml
from engine.report.run_report import RunReport
from engine.runtime import Runtime, resolve_runtime
from engine.schema import PruningError
from engine.stage import (
    BlockRecord,
    BlockStage,
    BlockVisit,
    LayerShape,
    ModelInfo,
    OutputChanges,
    StageResult,
    StatsRequest,
    build_stage,
)
from sharding import dist
from sharding.dist import DistInfo
from sharding.reader import CheckpointReader
from sharding.writer import INDEX_NAME, MANIFEST_NAME, CheckpointWriter

log = logging.getLogger(__name__)

NON_BLOCK_UNIT = "non_block"
EXTRA_UNIT = "extra_layers"  # layers stored after the last block (DeepSeek's MTP), written last
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def block_unit(i: int) -> str:
    return f"block.{i:05d}"


def check_input(config: dict) -> None:
    """ConfigError for an input this pipeline cannot prune: a non-uniform blockprune output (per-layer shapes in a
    `blockprune` section of config.json) is not the stock architecture layer by layer."""
    if config.get("blockprune"):
        raise ConfigError(
            "model is a non-uniform blockprune checkpoint (config.json has a 'blockprune' section with "
            "per-layer shapes); pruning it again is not supported: prune the dense model with all stages "
            "in one recipe"
        )


def check_output(cfg: RunConfig) -> None:
    """Fail before any work when the output cannot be written (the writer checks again when it opens it)."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (cfg.overwrite or cfg.resume):
        if (out / MANIFEST_NAME).is_file() and not (out / INDEX_NAME).is_file():
            # rerunning the command of an interrupted run continues it (the writer checks the run id)
            log.warning("output %s holds an interrupted run: resuming it (--overwrite starts over)", out)
            cfg.resume = True
            return
        raise ConfigError(f"output {out} is not empty; pass --overwrite to replace it or --resume to continue it")
    if out.resolve() == Path(cfg.model).resolve():
        raise ConfigError(f"output {out} is the input model directory")


def make_stages(cfg: RunConfig, adapter: ArchAdapter, config: dict) -> tuple[list[BlockStage], Budget | None]:
    """The run's stages, set up against the model (every refusal that needs the model's shapes happens here, before
    any weight is read or anything is written), and the budget of a globally allocated stage."""
    stages = [build_stage(c, k) for k, c in enumerate(cfg.prune)]
    model = ModelInfo(adapter, config, cfg, stages)
    for s in stages:
        s.setup(model)
    return stages, make_budget(stages, model)


def output_run_id(cfg: RunConfig, reader: CheckpointReader, info: DistInfo) -> str:
    """What a resumed run must match (stored in the writer's manifest): the recipe's output-determining keys
    (`RunConfig.run_id`), the input checkpoint's fingerprint and the world size (the bytes depend on the
    reduction order, docs/distributed.md)."""
    key = f"{cfg.run_id()}:{reader.fingerprint()}:{info.world_size}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def prune(model_dir: str | Path, config: RunConfig | dict) -> dict:
    """Library verb: prune `model_dir` with `config` (a RunConfig, or a recipe dict whose `model` may be omitted)."""
    from engine.config import config_from_dict

    if isinstance(config, dict):
        config = config_from_dict({**config, "model": str(model_dir)})
    else:
        config.model = str(model_dir)
    return run(config)


# --------------------------------------------------------------------------------------------- the run


def run(cfg: RunConfig) -> dict:
    """Prune `cfg.model` into `cfg.output`; returns the report (also written as blockprune_report.json)."""
    t_start = time.perf_counter()
    reader = CheckpointReader(cfg.model)
    check_reader(reader)  # config.json against the tensor headers, before any weight is read
    reader = source_reader(reader, cfg.runtime.dtype)  # FP8 sources are read dequantized (engine/fp8.py)
    check_input(reader.config)
    adapter = adapter_for(reader.config)
    stages, budget = make_stages(cfg, adapter, dict(reader.config))
    check_output(cfg)
    model = ModelInfo(adapter, dict(reader.config), cfg, stages)
    for s in stages:
        s.prepare(reader)  # e.g. expert counts per layer from the router rows
    if budget is not None:
        budget.prepare(model)
    memory_plan = plan_for_run(cfg, reader, adapter, stages)  # the same budget `blockprune plan` prints
    if not memory_plan.fits:
        message = "; ".join(memory_plan.advice) or "the memory plan does not fit"
        if memory_plan.device.startswith("cuda"):
            raise PruningError(f"the run does not fit: {message} (see `blockprune plan`)")
        log.warning("the memory plan exceeds this machine's available memory: %s", message)
    rt = resolve_runtime(cfg, reader)
    log.info(
        "blockprune: %s (%s, %d blocks) -> %s on %s/%s",
        cfg.model,
        adapter.model_type,
        adapter.num_layers,
        cfg.output,
        rt.device,
        str(rt.dtype).replace("torch.", ""),
    )
    tokenizer = load_tokenizer(cfg.model)
    ids = load_calibration(cfg.calibration, tokenizer)[dist.sample_slice(cfg.calibration.samples, rt.dist)]
    run_id = output_run_id(cfg, reader, rt.dist)
    writer = RankWriter(
        lambda: CheckpointWriter(
            cfg.output,
            max_shard_size=parse_size(cfg.max_shard_size),
            overwrite=cfg.overwrite,
            resume=cfg.resume,
            run_id=run_id,
            protected=_protected(cfg),
            own_files=[SCORES_FILE],
        ),
        rt.dist,
    )
    try:
        return _run(cfg, reader, adapter, stages, budget, memory_plan, rt, ids, writer, run_id, t_start)
    finally:
        writer.close()


def _run(cfg, reader, adapter, stages, budget, memory_plan, rt, ids, writer, run_id, t_start) -> dict:
    report = RunReport.start(cfg, adapter, rt)
    report.data["run_id"] = run_id
    report.data["world_size"] = rt.dist.world_size
    _copy_non_block(reader, adapter, writer)
    builder = BlockBuilder(reader, adapter, rt)
    shapes: dict[int, LayerShape] = {}
    with ActivationCache(
        ids.shape[0],
        ids.shape[1],
        adapter.config.hidden_size,
        dtype=rt.dtype,
        device=rt.device,
        micro_batch=rt.micro_batch,
        **_cache_budgets(rt, memory_plan),
        spill_dir=rt.spill_dir,
    ) as cache:
        report.cache_tier = cache.tier
        runner = BlockRunner(adapter, cache, rt)
        loop = BlockLoop(cfg, stages, budget, builder, runner, writer, rt, memory_plan)

        def embed() -> None:
            _embed(reader, adapter, ids, cache, rt)

        if budget is not None:
            budget.lookup(reader, rt, ids)
        scorers = [s.scorer() for s in stages] + [budget.scorer() if budget is not None else None]
        if any(sc is not None and sc.needed() for sc in scorers):
            with builder.overlapping(range(adapter.num_layers), cfg.runtime.overlap):
                scoring_pass(builder, runner, scorers, embed)
        kept = [i for i in range(adapter.num_layers) if not any(s.skips(i) for s in stages)]
        if budget is not None:
            budget.plan(kept)
        embed()
        committed = {i for i in kept if writer.is_committed(block_unit(kept.index(i)))}  # same order on every rank
        records = []
        with builder.overlapping([i for i in kept if i not in committed], cfg.runtime.overlap) as io:
            loop.io = io
            bar = tqdm(kept, desc="blocks", unit="block", disable=not rt.progress, dynamic_ncols=True)
            for i in bar:
                record, shapes[i] = loop.visit(i, kept.index(i))
                records.append(record)
                err = record.output_error
                bar.set_postfix(peak_rss=f"{memory.peak_rss_mb():.0f}MB", err="-" if err is None else f"{err:.3g}")
                cache.swap()
        loop.io = None
    for record in records:  # complete now: the last writes (and their times) have finished
        report.add_block(record.to_dict())
    report.finish(time.perf_counter() - t_start, reader=reader)
    changes = OutputChanges()
    for s in stages:
        changes = changes | s.output()
    report.data.update(changes.report)
    if budget is not None:
        report.data["allocation"] = budget.report()
    if not rt.dist.is_main:
        dist.barrier(rt.dist)  # rank 0 finalizes; every rank returns once the checkpoint is complete
        return report.data
    _finalize(cfg, reader, writer, report, changes, [shapes[i] for i in kept])
    log.info("wrote %s (%.1f s, peak RSS %.0f MB)", cfg.output, report.wall_time_s, memory.peak_rss_mb())
    dist.barrier(rt.dist)
    return report.data


def _protected(cfg: RunConfig) -> dict[str, str]:
    """What the writer must never remove, whatever `overwrite` says: the input model, the calibration data."""
    out = {cfg.model: "the input model"}
    data = Path(str(cfg.calibration.data))
    if data.exists():
        out[str(data)] = "the calibration data"
    return out


def _finalize(
    cfg: RunConfig,
    reader: CheckpointReader,
    writer: RankWriter,
    report: RunReport,
    changes: OutputChanges,
    shapes: list[LayerShape],
) -> None:
    """The output config from the written layers' shapes: one shape for all -> the stock architecture with its
    fields; several -> a non-uniform checkpoint (per-layer entries, `modeling_blockprune.py`), rewritten in the
    padded stock layout when the recipe asks for it (`export.layout: padded`, engine/padded.py). Also what the
    checkpoint is: `sparsity_config` in config.json, the README.md model card, `total_parameters` in the index
    (engine/report/card.py)."""
    from engine.padded import pad_in_place
    from engine.report.card import CARD_NAME, SPARSITY_KEY, model_card, run_sparsity

    stock, entries = split_shapes(shapes)
    out_config = output_config(dict(reader.config), {**changes.overrides, **stock}, changes.removed_layers)
    _copy_extra_layers(reader, writer, len(shapes), reshaped=bool(stock or entries or changes.overrides))
    params, sparsity = run_sparsity(cfg, reader, report.data, shapes)
    if sparsity is not None:
        out_config[SPARSITY_KEY] = sparsity
    recipe_text = config_to_yaml(cfg)
    extra: dict[str, str | bytes] = {
        "blockprune_recipe.yaml": recipe_text,
        "blockprune_report.json": report.to_json(),
        # the same recipe in llm-compressor's modifiers, where one exists (engine/report/llmc_recipe.py)
        "llmcompressor_recipe.yaml": llmc_recipe_yaml(yaml.safe_load(recipe_text), report.data),
    }
    if entries:
        out_config, extra[MODELING_FILE] = nonuniform_config(out_config, entries)
    extra[CARD_NAME] = model_card(out_config, report=report.data, recipe_text=recipe_text, total_parameters=params)
    if cfg.report_plots:  # written by finalize, inside the output's commit (the writer knows them as its own)
        from engine.report.render import render_report

        extra.update(render_report(report.data))
    writer.finalize(out_config, source_dir=cfg.model, extra_files=extra, index_metadata={"total_parameters": params})
    if cfg.export.layout == "padded" and entries:
        report.data["export"] = pad_in_place(cfg.output, max_shard_size=cfg.max_shard_size)


def split_shapes(shapes: list[LayerShape]) -> tuple[dict, list[dict]]:
    """(stock config fields, per-layer entries) of the output layers' shapes. One shape: its fields, no entries.
    Several: the fields every layer sets to one value (the others keep the source's value in the stock config) and
    one `{"attention", "mlp", "config"}` entry per layer (engine/modeling_blockprune.py)."""
    if len(set(shapes)) <= 1:
        return (shapes[0].config if shapes else {}), []
    first = shapes[0].config
    stock = {k: v for k, v in first.items() if all(s.config.get(k, object()) == v for s in shapes)}
    entries = [{"attention": s.attention, "mlp": s.mlp, "config": s.config} for s in shapes]
    return stock, entries


# --------------------------------------------------------------------------------------------- one block


@dataclass
class BlockLoop:
    """Visits blocks: decides each stage's target, builds, gathers, applies the stages, propagates, writes."""

    cfg: RunConfig
    stages: list[BlockStage]
    budget: Budget | None
    builder: BlockBuilder
    runner: BlockRunner
    writer: RankWriter
    rt: Runtime
    memory: MemoryPlan | None = None
    io: BlockIO | None = None  # write-behind (and the builder's read-ahead), set while the loop runs

    def __post_init__(self) -> None:
        self.reconstruct = reconstruct_config(self.stages)

    @property
    def adapter(self) -> ArchAdapter:
        return self.builder.adapter

    def visit(self, i: int, j: int) -> tuple[BlockRecord, LayerShape]:
        """Source block `i`, written as output block `j`: its record and the shape it was written with."""
        decision = self.budget.decide(i) if self.budget is not None else None
        targets = {s.key: decision if self.budget is not None and s is self.budget.stage else None for s in self.stages}
        shape = LayerShape()
        for s in self.stages:
            shape = shape | s.layer_shape(i, targets[s.key])
        unit = block_unit(j)
        t0 = time.perf_counter()
        memory.reset_device_peak(self.rt.device)
        if self.writer.is_committed(unit):
            return self._resume(i, j, unit, shape, decision), shape
        block, src_dtypes = self.builder.read(i, shape)
        visit = BlockVisit(
            i=i,
            j=j,
            adapter=self.adapter,
            out_adapter=self.builder.adapter_for(shape),
            block=block,
            rt=self.rt,
            run_sharded=lambda tasks, costs, fn: run_sharded(tasks, costs, fn, self.rt.dist),
        )
        del block
        times = {"load": time.perf_counter() - t0}
        if self._one_pass_ok(visit, shape):
            record, tensors, results = self._one_pass(visit, targets, src_dtypes, times)
        else:
            record, tensors, results = self._two_forwards(visit, targets, src_dtypes, shape, times)
        self._verify(record, tensors, results, targets)
        self._write(unit, record, tensors, decision, t0)
        del tensors
        free_block(visit.block)
        return record, shape

    # ---- the two-forward path -----------------------------------------------------------------------------------
    def _two_forwards(
        self, visit: BlockVisit, targets: dict, src_dtypes: dict, shape: LayerShape, times: dict
    ) -> tuple[BlockRecord, dict[str, torch.Tensor], dict[str, StageResult]]:
        t = time.perf_counter()
        request = StatsRequest.union([s.stats(visit, targets[s.key]) for s in self.stages])
        capture = self._capture(visit)  # the dense sublayer output, for reconstruction by sublayer
        visit.stats = self._gather(visit, request, [capture] if capture is not None else [])  # dense -> the cache
        times["stats"] = time.perf_counter() - t
        t = time.perf_counter()
        dense_block = visit.block
        results = {s.key: s.apply(visit, targets[s.key]) for s in self.stages}
        changed = visit.block is not dense_block or any(r.linears or r.removed for r in results.values())
        del dense_block
        visit.stats = {}
        times["solve"] = time.perf_counter() - t
        section = None
        if self.reconstruct is not None and changed:  # every stage done: train what is left towards the dense block
            t = time.perf_counter()
            section = reconstruct_block(visit.block, self.runner, self.reconstruct, intermediate=capture)
            times["reconstruct"] = time.perf_counter() - t
        del capture
        t = time.perf_counter()
        tensors = self._as_written(visit, src_dtypes, shape)
        out_err = None
        if self.cfg.sequential and changed:
            out_err = self.runner.propagate(visit.block, compare=True)
        times["forward"] = time.perf_counter() - t
        record = self._record(visit, results, tensors, times, out_err)
        if section is not None:
            record.sections["reconstruct"] = section
        return record, tensors, results

    def _capture(self, visit: BlockVisit) -> DenseIntermediate | None:
        """An observer of the dense forward keeping each micro-batch's dense attention-sublayer output when the
        block is reconstructed by sublayer (on the device when the cache is and it fits beside it, else the host)."""
        rc = self.reconstruct
        if rc is None or not needs_intermediate(visit.block, rc):
            return None
        cache = self.runner.cache
        fits = cache.tier == "device" and DenseIntermediate.bytes_for(*cache.shape, cache.dtype) <= self._side_budget()
        return DenseIntermediate(visit.block, cache, device=None if fits else "cpu")

    def _gather(self, visit: BlockVisit, request: StatsRequest, extra: list | None = None) -> dict:
        """The statistics of `request` from the dense block: one forward, or, when the memory plan chunks this
        block, one forward per chunk of inputs with each chunk's statistics moved to the host (exactly what one
        forward gives; the stages' solvers move each back to the device when they solve it)."""
        observers = [s.observe(visit) for s in self.stages] + list(extra or [])
        plan = self.memory.block(visit.i) if self.memory is not None else None
        if plan is None or plan.stats_chunks <= 1:
            return self.runner.dense(visit.block, visit.i, request, observers=observers).stats
        stats: dict = {}
        for k, chunk in enumerate(plan.chunks):
            ids = set(chunk)
            part = StatsRequest(request.gram & ids, request.moments & ids, request.track & ids)
            dense = self.runner.dense(
                visit.block, visit.i, part, observers=observers if k == 0 else (), write_outputs=k == 0
            )
            stats.update({name: stats_to(st, torch.device("cpu")) for name, st in dense.stats.items()})
            del dense
        return stats

    def _as_written(self, visit: BlockVisit, src_dtypes: dict, shape: LayerShape) -> dict[str, torch.Tensor]:
        """The block's tensors as written (on-disk names of output block j, the source's dtypes). When those differ
        from the compute dtype the block is rebuilt from them, so that the next block sees what the saved model
        computes and a resumed run (which reads them back) is bit-identical."""
        dtypes = _dtypes_for(visit.out_adapter.block_to_disk(visit.i, visit.block).keys(), src_dtypes)
        tensors = visit.out_adapter.block_to_disk(visit.i, visit.block, dtypes)
        if any(t.dtype != self.rt.dtype for t in tensors.values() if t.is_floating_point()):
            free_block(visit.block)
            visit.block = self.builder.build(visit.i, tensors, shape)
        return _renumber(tensors, self.adapter.block_prefix(visit.i), self.adapter.block_prefix(visit.j))

    def _record(
        self,
        visit: BlockVisit,
        results: dict[str, StageResult],
        tensors: dict[str, torch.Tensor],
        times: dict,
        out_err: float | None,
        **extra,
    ) -> BlockRecord:
        record = BlockRecord(block=visit.i, output_block=visit.j, output_error=out_err, **extra)
        for s in self.stages:
            r = results.get(s.key)
            if r is None:
                continue
            record.linears.update(r.linears)
            record.removed[s.key] = int(r.removed)
            if s.section is not None and r.section is not None:
                record.sections[s.section] = r.section
            times.update(r.time_s)
        record.params = sum(int(t.numel()) for t in tensors.values())
        record.nonzero = sum(int(torch.count_nonzero(t)) for t in tensors.values())
        record.time_s = {k: round(v, 4) for k, v in times.items()}
        return record

    def _verify(
        self, record: BlockRecord, tensors: dict[str, torch.Tensor], results: dict[str, StageResult], targets: dict
    ) -> None:
        """Before the block is committed: every stage achieved its plan (`BlockStage.verify`), every written tensor
        is finite, and so is the block's output error. A PruningError stops the run; the block is not written."""
        for s in self.stages:
            s.verify(results[s.key], targets[s.key])
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise PruningError(f"block {record.block}: the pruned {name} holds NaN/Inf; nothing was written")
        if record.output_error is not None and not math.isfinite(record.output_error):
            raise PruningError(f"block {record.block}: its output error is {record.output_error}; nothing was written")

    def _write(self, unit: str, record: BlockRecord, tensors: dict[str, torch.Tensor], decision, t0: float) -> None:
        """Complete the record (memory, its allocation record), write the block as `unit` with the record as its
        metadata, add the write and total times."""
        record.memory = {
            "peak_rss_mb": round(memory.peak_rss_mb(), 1),  # process peak so far (monotone)
            "rss_mb": round(memory.rss_mb(), 1),
            "peak_device_mb": memory.device_peak_mb(self.rt.device),
        }
        self._record_budget(record, decision)
        metadata = {**record.to_dict(volatile=False), "source_digest": self._source_digest(record.block)}
        record.time_s["total"] = round(time.perf_counter() - t0, 4)  # the block's compute, up to its write

        def write() -> None:
            t = time.perf_counter()
            self.writer.write_unit(unit, tensors, metadata=metadata, measurements=_measurements(record))
            record.time_s["write"] = round(time.perf_counter() - t, 4)

        if self.io is not None:
            self.io.write(write)  # behind the next block's compute; at most one pending
        else:
            write()

    def _source_names(self, i: int) -> list[str]:
        return self.builder.reader.names_with_prefix(self.adapter.block_prefix(i))

    def _source_digest(self, i: int) -> str:
        """The digest of source block `i`'s bytes (hashed as they were read: no second read)."""
        return self.builder.reader.digest(self._source_names(i))

    def _record_budget(self, record: BlockRecord, decision) -> None:
        if self.budget is not None and decision is not None:
            rec = self.budget.record(record.block, record, decision)
            if rec is not None:
                record.sections["allocation"] = rec

    # ---- resume -------------------------------------------------------------------------------------------------
    def _resume(self, i: int, j: int, unit: str, shape: LayerShape, decision) -> BlockRecord:
        """Block `i` was written by an interrupted run: rebuild the activations from the written block."""
        disk = _renumber(
            self.writer.read_unit(unit, device=self.rt.device),
            self.adapter.block_prefix(j),
            self.adapter.block_prefix(i),
        )
        meta = self.writer.unit_metadata(unit)
        if "source_digest" in meta:  # the source bytes it was computed from are still the checkpoint's
            self.builder.reader.verify_digest(
                self._source_names(i), meta["source_digest"], what=f"unit {unit!r} (block {i})"
            )
        block = self.builder.build(i, disk, shape)
        del disk
        self.runner.propagate(block)
        free_block(block)
        record = BlockRecord.from_dict(meta)
        record.resumed = True
        measured = self.writer.unit_measurements(unit)  # the interrupted run's times and memory
        record.time_s = dict(measured.get("time_s", {}))
        record.memory = {k: v for k, v in measured.items() if k != "time_s"}
        record.sections.pop("allocation", None)
        self._record_budget(record, decision)
        return record

    # ---- the one-pass true-sequential path ----------------------------------------------------------------------
    def _one_pass_ok(self, visit: BlockVisit, shape: LayerShape) -> bool:
        """Whether the block takes the one-pass path (`engine.sequential`): `true_sequential` and `sequential` on,
        every stage `linear_wise`, a dense GQA block whose pieces compose to its forward, and the held
        intermediates fit beside the activation cache."""
        cfg, rt, cache = self.cfg, self.rt, self.runner.cache
        if not (cfg.true_sequential and cfg.sequential and self.stages) or shape.sublayers_removed:
            return False
        if not all(s.linear_wise for s in self.stages) or seq_mod.parts_of(self.adapter, visit.block) is None:
            return False
        if self.reconstruct is not None:  # reconstruction trains towards the dense outputs of every sample
            return False
        tokens = cache.shape[0] * cache.shape[1]
        core, _ = seq_mod.side_bytes(self.adapter, visit.block, tokens, rt.dtype)
        fits = cache.tier != "disk" and core <= self._side_budget()
        planned = self._planned(visit.i)
        if planned is not None:  # on a GPU the memory plan decided (engine/memory_plan.py)
            fits = planned.one_pass
        ok = _DECOMPOSITION_OK.get(type(visit.block))
        if ok is None:
            x = cache.get(0)[:1]
            ok = seq_mod.decomposition_matches(self.adapter, visit.block, x, self.runner.ctx(1))
            if rt.dist.enabled:  # every rank takes the same path
                ok = dist.all_reduce_floats([float(ok)], rt.dist)[0] == rt.dist.world_size
            _DECOMPOSITION_OK[type(visit.block)] = ok
        if rt.dist.enabled:
            fits = dist.all_reduce_floats([float(fits)], rt.dist)[0] == rt.dist.world_size
        if ok and not fits:
            log.info(
                "block %d: the true-sequential intermediates (%.0f MiB) do not fit beside the activation cache; "
                "two forwards instead",
                visit.i,
                core / 2**20,
            )
        return ok and fits

    def _planned(self, i: int):
        """The memory plan's budget of block `i` on a CUDA device (None on a CPU, where the budgets decide)."""
        if self.memory is None or not self.memory.device.startswith("cuda"):
            return None
        return self.memory.block(i)

    def _side_budget(self) -> int:
        """Bytes left in the cache's memory tier for the true-sequential intermediates."""
        cache = self.runner.cache
        budget = self.rt.device_budget if cache.tier == "device" else self.rt.host_budget
        return (2**62 if budget is None else budget) - cache.nbytes()

    def _one_pass(
        self, visit: BlockVisit, targets: dict, src_dtypes: dict, times: dict
    ) -> tuple[BlockRecord, dict[str, torch.Tensor], dict[str, StageResult]]:
        """The block through `engine.sequential.run`: each input group's statistics gathered after the groups
        before it are pruned, then solved by every stage (weights rounded to the checkpoint's dtype at once)."""
        t_pass = time.perf_counter()
        specs = visit.specs()
        request = StatsRequest.union([s.stats(visit, targets[s.key]) for s in self.stages])
        widths = {s.input_id: s.d_in for s in specs}
        results = {s.key: StageResult() for s in self.stages}
        prefix = self.adapter.block_prefix(visit.i)
        solve_s = [0.0]

        def gather(input_id: str, feed) -> dict:
            if input_id not in request.wanted:
                feed(None)
                return {}
            collect = StatsCollector(widths, request)
            feed(collect.observer(input_id))
            return collect.reduced(self.rt)

        def solve(group: list[LinearSpec], stats: dict) -> dict:
            t = time.perf_counter()
            linears: dict[str, dict] = {}
            for s in self.stages:
                r = s.solve_linears(visit, group, stats, targets[s.key])
                results[s.key].linears.update(r.linears)
                results[s.key].removed += r.removed
                linears.update(r.linears)
            for spec in group:  # propagate with the weights as written
                disk = src_dtypes.get(f"{prefix}{spec.name}.weight")
                W = self.adapter.get_weight(visit.block, spec)
                if spec.name in linears and disk is not None and disk != W.dtype:
                    self.adapter.set_weight(visit.block, spec, W.to(disk).to(W.dtype))
            solve_s[0] += time.perf_counter() - t
            return linears

        cache = self.runner.cache
        tokens = cache.shape[0] * cache.shape[1]
        _, mlp_hidden = seq_mod.side_bytes(self.adapter, visit.block, tokens, self.rt.dtype)
        planned = self._planned(visit.i)
        keep_mlp = planned.keep_mlp if planned is not None else mlp_hidden <= self._side_budget()
        side_device = cache.device if cache.tier == "device" else torch.device("cpu")
        _, (num, den) = seq_mod.run(
            self.adapter,
            visit.block,
            specs,
            cache,
            self.runner.ctx,
            gather,
            solve,
            keep_mlp_hidden=keep_mlp,
            side_device=side_device,
        )
        num, den = dist.all_reduce_floats([num, den], self.rt.dist)
        tensors = _renumber(
            visit.out_adapter.block_to_disk(visit.i, visit.block, src_dtypes),
            prefix,
            self.adapter.block_prefix(visit.j),
        )
        pass_s = time.perf_counter() - t_pass
        times.update({"stats": pass_s - solve_s[0], "solve": solve_s[0], "forward": 0.0})
        # the one-pass path never computes the dense outputs of all samples: the error is on the first one
        err = num / den if den > 0 else None
        record = self._record(visit, results, tensors, times, err, output_error_on="first sample", true_sequential=True)
        return record, tensors, results


_DECOMPOSITION_OK: dict[type, bool] = {}  # block class -> its pieces compose to its forward (checked once per process)


# --------------------------------------------------------------------------------------------- helpers


def _cache_budgets(rt: Runtime, plan: MemoryPlan) -> dict:
    """The activation cache's budgets: on a CUDA device the memory plan chooses its tier (device when it fits beside
    the widest block, else pinned host memory, else disk), capped by the recipe's budgets; on a CPU the recipe's
    (or the default) budgets choose."""
    if not plan.device.startswith("cuda"):
        return {"device_budget_bytes": rt.device_budget, "host_budget_bytes": rt.host_budget}
    if plan.cache_tier == "device":
        return {"device_budget_bytes": rt.device_budget, "host_budget_bytes": rt.host_budget}
    return {"device_budget_bytes": 0, "host_budget_bytes": rt.host_budget if plan.cache_tier == "host" else 0}


def _dtypes_for(names, src: dict[str, torch.dtype]) -> dict[str, torch.dtype]:
    """Disk dtypes of the written tensors: the source's; a tensor the source lacks (a compensation bias) takes
    the dtype of its weight."""
    out = dict(src)
    for n in names:
        if n not in out:
            w = n[: -len("bias")] + "weight"
            if w in src:
                out[n] = src[w]
    return out


def _renumber(tensors: dict[str, torch.Tensor], old_prefix: str, new_prefix: str) -> dict[str, torch.Tensor]:
    if old_prefix == new_prefix:
        return tensors
    return {new_prefix + n[len(old_prefix) :]: t for n, t in tensors.items()}


def _copy_non_block(reader: CheckpointReader, adapter: ArchAdapter, writer: RankWriter) -> None:
    """Embeddings, final norm and lm_head are copied through unpruned (byte-identical; an FP8 source's weights
    dequantized), by rank 0. Layers after the last block are `_copy_extra_layers`'."""
    names = [n for n in adapter.non_block_keys(reader.names()) if _extra_layer(n, adapter.num_layers) is None]
    _copy_unit(reader, writer, NON_BLOCK_UNIT, names, lambda tensors: tensors, "the embeddings/norm/lm_head unit")


def _copy_unit(
    reader: CheckpointReader,
    writer: RankWriter,
    unit: str,
    names: list[str],
    rename: Callable[[dict], dict],
    what: str,
    *,
    all_ranks: bool = True,
) -> None:
    """Copy source tensors `names` (renamed by `rename`) as `unit`, with their source digest; a committed unit's
    sources are verified instead (resume). `all_ranks`: every rank calls this (the writer's queries are then
    collectives); else only rank 0 does (finalize), which asks its own writer."""
    if all_ranks:
        committed = writer.is_committed(unit)
        meta = writer.unit_metadata(unit) if committed else {}
    elif writer.writer is not None:
        committed = writer.writer.is_committed(unit)
        meta = writer.writer.unit_metadata(unit) if committed else {}
    else:
        return
    if writer.writer is None:
        return
    if committed:
        if meta.get("source_digest") is not None:
            reader.verify_digest(names, meta["source_digest"], what=what)
        return
    tensors = reader.read(names)
    check_finite(tensors)
    writer.write_unit(unit, rename(tensors), metadata={"source_digest": reader.digest(names)})


def _extra_layer(name: str, num_layers: int) -> int | None:
    """The index of a layer stored after the last block (`model.layers.{k}.*`, k >= num_layers) holding `name`."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m is not None and int(m.group(1)) >= num_layers else None


def _copy_extra_layers(reader: CheckpointReader, writer: RankWriter, n_out: int, *, reshaped: bool) -> None:
    """Layers stored after the last block (DeepSeek-V3's multi-token-prediction layers, `num_nextn_predict_layers`)
    copied unpruned (an FP8 source's weights dequantized) as their own unit, renumbered to follow the `n_out` written
    blocks (depth pruning removes blocks). transformers builds no MTP module: it ignores `model.layers.61.*` by name
    and loads any other index with an "unexpected keys" warning. `reshaped`: the written blocks' config fields differ
    from the source's (e.g. fewer experts), which the copied layers keep: said in the log."""
    n = int(reader.config["num_hidden_layers"])
    names = [name for name in reader.names() if _extra_layer(name, n) is not None]
    if not names or writer.writer is None:
        return

    def renumber(tensors: dict) -> dict:
        out = {}
        for name, t in tensors.items():
            k = _extra_layer(name, n)
            out[f"model.layers.{n_out + k - n}.{name[len(f'model.layers.{k}.') :]}"] = t
        return out

    if reshaped and not writer.writer.is_committed(EXTRA_UNIT):
        log.warning(
            "layers %s after the last block (multi-token prediction) are copied with the source's shapes, not "
            "pruned like the blocks; transformers does not load them",
            sorted({k for name in names if (k := _extra_layer(name, n)) is not None}),
        )
    _copy_unit(reader, writer, EXTRA_UNIT, names, renumber, "the layers after the last block", all_ranks=False)


def _measurements(record: BlockRecord) -> dict:
    """What the writer keeps beside the manifest (never in it: they differ between two runs of one recipe)."""
    return {**record.memory, "time_s": dict(record.time_s)}


def _embed(reader: CheckpointReader, adapter: ArchAdapter, ids: torch.Tensor, cache: ActivationCache, rt: Runtime):
    W = reader.read([adapter.embed_key], device=rt.device, dtype=rt.dtype)[adapter.embed_key]
    mb = rt.micro_batch
    for b in range(cache.num_batches()):
        cache.put(b, F.embedding(ids[b * mb : (b + 1) * mb].to(rt.device), W))
    del W
    cache.swap()


__all__ = ["BlockLoop", "block_unit", "check_input", "check_output", "kept_layers", "prune", "run"]
