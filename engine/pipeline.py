"""The block loop (DESIGN.md §2): one transformer block on the device at a time.

    reader -> embed(ids) -> for each block: load -> statistics (one dense forward with input hooks)
           -> solve every selected linear -> forward the pruned block (sequential) -> write -> free
    -> finalize (config, tokenizer files, recipe, report; the index last)

Nothing here holds more than one block's weights, its input statistics and the calibration activations.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engine import coordinator as alloc_mod
from engine import memory
from engine import sequential as seq_mod
from engine.arch import ArchAdapter, LinearSpec, adapter_for
from engine.cache import ActivationCache, default_budgets
from engine.calibration import load_calibration
from engine.config import (
    ConfigError,
    DepthStage,
    RunConfig,
    StructuredStage,
    UnstructuredStage,
    config_to_yaml,
    name_selected,
    parse_nm,
    parse_size,
)
from engine.distributed import RankWriter, reduce_stats, run_sharded
from engine.export import MODELING_FILE, kept_layers, nonuniform_config, output_config
from engine.modeling_blockprune import remove_sublayers
from engine.report.run_report import RunReport
from engine.stages import experts as es
from engine.stages import structured as st_mod
from sharding import dist
from sharding.dist import DistInfo
from sharding.reader import CheckpointReader
from sharding.writer import INDEX_NAME, MANIFEST_NAME, CheckpointWriter
from solvers.registry import get_solver, needs_gram
from solvers.scores import block_influence
from solvers.sparsegpt import sparsegpt_prune_many
from solvers.stats import InputStats, accumulate, init_stats, layer_error

log = logging.getLogger(__name__)

NON_BLOCK_UNIT = "non_block"


def block_unit(i: int) -> str:
    return f"block.{i:05d}"


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    micro_batch: int
    device_budget: int | None
    host_budget: int | None
    spill_dir: str
    progress: bool
    dist: DistInfo = field(default_factory=DistInfo)


@dataclass
class BlockPlan:
    """Which stages prune which linears of one block, and what statistics that needs per input."""

    stages: dict[str, list] = field(default_factory=dict)  # linear name -> stages in order
    gram_inputs: set[str] = field(default_factory=set)  # input ids that need the full Gram
    moment_inputs: set[str] = field(default_factory=set)  # input ids that need only column norms
    track_inputs: set[str] = field(default_factory=set)  # input ids that also need sums (means, variances)


@dataclass
class Job:
    """What the run does besides unstructured stages: the structured plan (and the adapter of the shrunk blocks, in
    source numbering) and the depth removal (source layer indices; output layer j is source layer `kept[j]`)."""

    structured: StructuredStage | None = None
    plan: st_mod.StructuredPlan | None = None
    layer_adapter: ArchAdapter | None = None
    removed: list[int] = field(default_factory=list)
    influence: list[float] = field(default_factory=list)
    sublayers: dict[int, dict[str, bool]] = field(default_factory=dict)  # source layer -> {"attention", "mlp"} kept
    experts: es.ExpertsJob | None = None  # the experts stage (engine/stages/experts.py)
    allocation: alloc_mod.AllocationJob | None = None  # a global budget over the layers (engine/coordinator.py)

    def out_index(self, i: int, num_layers: int) -> int:
        return kept_layers(num_layers, self.removed).index(i)


def resolve_runtime(cfg: RunConfig, reader: CheckpointReader) -> Runtime:
    rt = cfg.runtime
    if rt.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(rt.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"runtime.device = {rt.device}: CUDA is not available on this machine")
    if rt.dtype == "auto":
        dtype = _checkpoint_dtype(reader) if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, rt.dtype)
    if rt.threads:
        torch.set_num_threads(rt.threads)
    info = dist.init_from_env(device.type)
    spill_dir = rt.spill_dir or cfg.output
    if info.enabled:
        if device.type == "cuda":  # one GPU per rank (a launcher that narrows CUDA_VISIBLE_DEVICES leaves one)
            device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        spill_dir = str(Path(spill_dir) / f".rank{info.rank}")
        if len(range(cfg.calibration.samples)[dist.sample_slice(cfg.calibration.samples, info)]) == 0:
            raise ConfigError(
                f"calibration.samples = {cfg.calibration.samples} is fewer than the {info.world_size} "
                "ranks: every rank needs at least one sample"
            )
    gb = 2**30
    dev_default, host_default = default_budgets(device)
    return Runtime(
        device=device,
        dtype=dtype,
        micro_batch=rt.micro_batch,
        device_budget=int(rt.device_budget_gb * gb) if rt.device_budget_gb is not None else dev_default,
        host_budget=int(rt.host_budget_gb * gb) if rt.host_budget_gb is not None else host_default,
        spill_dir=spill_dir,
        progress=rt.progress and info.is_main,
        dist=info,
    )


def _checkpoint_dtype(reader: CheckpointReader) -> torch.dtype:
    floats = [reader.torch_dtype(n) for n in reader.names() if reader.torch_dtype(n).is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def _stage_of(cfg: RunConfig, cls: type):
    return next((s for s in cfg.prune if isinstance(s, cls)), None)


def plan_block(adapter: ArchAdapter, specs: list[LinearSpec], stages: list) -> BlockPlan:
    plan = BlockPlan()
    stages = [s for s in stages if isinstance(s, UnstructuredStage)]
    for spec in specs:
        chosen = [s for s in stages if name_selected(spec.name, s.targets, s.ignore)]
        if not chosen:
            continue
        plan.stages[spec.name] = chosen
        for s in chosen:
            if needs_gram(s.method):
                plan.gram_inputs.add(spec.input_id)
            elif s.method != "magnitude":
                plan.moment_inputs.add(spec.input_id)
    plan.moment_inputs -= plan.gram_inputs
    return plan


def validate_against_model(cfg: RunConfig, adapter: ArchAdapter) -> None:
    """Checks that need the model's shapes but no weights: N:M divides every selected input width, and every
    stage selects at least one linear."""
    specs = [s for i in range(adapter.num_layers) for s in adapter.meta_linears(i)]
    for k, stage in enumerate(cfg.prune):
        if isinstance(stage, DepthStage) and stage.by == "block" and stage.remove >= adapter.num_layers:
            raise ConfigError(f"prune[{k}].remove = {stage.remove}: the model has only {adapter.num_layers} blocks")
        if isinstance(stage, StructuredStage) and adapter.spec.attention != "gqa":
            raise ConfigError(
                f"prune[{k}]: structured pruning of {adapter.model_type} (MLA attention) is not supported yet"
            )
        if not isinstance(stage, UnstructuredStage):
            continue
        chosen = [s for s in specs if name_selected(s.name, stage.targets, stage.ignore)]
        if not chosen:
            names = ", ".join(sorted({s.name for s in specs})[:12])
            raise ConfigError(
                f"prune[{k}]: targets {stage.targets} (ignore {stage.ignore}) select no linear; names: {names}"
            )
        nm = parse_nm(stage.pattern, f"prune[{k}]")
        if nm is not None:
            bad = [s.name for s in chosen if s.d_in % nm[1]]
            if bad:
                raise ConfigError(
                    f"prune[{k}]: pattern {stage.pattern} needs input widths divisible by {nm[1]}: {bad[0]}"
                )


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


# --------------------------------------------------------------------------------------------- the run


def run(cfg: RunConfig) -> dict:
    """Prune `cfg.model` into `cfg.output`; returns the report (also written as blockprune_report.json)."""
    t_start = time.perf_counter()
    reader = CheckpointReader(cfg.model)
    check_input(reader.config)
    adapter = adapter_for(reader.config)
    validate_against_model(cfg, adapter)
    job = make_job(cfg, adapter, reader.config)
    check_output(cfg)
    es.allocate(job.experts, reader)  # expert counts per MoE layer (per_layer: from the router rows)
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

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    ids = load_calibration(cfg.calibration, tokenizer)[dist.sample_slice(cfg.calibration.samples, rt.dist)]
    run_id = output_run_id(cfg, reader, rt.dist)
    writer = RankWriter(
        lambda: CheckpointWriter(
            cfg.output,
            max_shard_size=parse_size(cfg.max_shard_size),
            overwrite=cfg.overwrite,
            resume=cfg.resume,
            run_id=run_id,
        ),
        rt.dist,
    )
    report = RunReport.start(cfg, adapter, rt)
    report.data["run_id"] = run_id
    report.data["world_size"] = rt.dist.world_size
    if job.plan is not None:
        report.data["structured_plan"] = {
            "remove_per_layer": job.plan.remove,
            "config": job.plan.overrides,
            "block_params_before": job.plan.params_before,
            "block_params_after": job.plan.params_after,
            "target": job.plan.target,
            "achieved": round(job.plan.achieved, 6),
        }
    if job.experts is not None:
        report.data["experts"] = es.report_section(job.experts)

    _copy_non_block(reader, adapter, writer)
    hidden = adapter.config.hidden_size
    with ActivationCache(
        ids.shape[0],
        ids.shape[1],
        hidden,
        dtype=rt.dtype,
        device=rt.device,
        micro_batch=rt.micro_batch,
        device_budget_bytes=rt.device_budget,
        host_budget_bytes=rt.host_budget,
        spill_dir=rt.spill_dir,
    ) as cache:
        report.cache_tier = cache.tier
        depth = _stage_of(cfg, DepthStage)
        if depth is not None:
            _embed(reader, adapter, ids, cache, rt)
            report.data["depth"] = _plan_depth(depth, job, _depth_scoring_pass(reader, adapter, cache, rt, depth.by))
        if job.allocation is not None:  # the scoring pass (or its cached result) and the per-layer plan
            job.allocation.prepare(
                reader,
                cache,
                rt,
                ids,
                removed=job.removed,
                embed=lambda: _embed(reader, adapter, ids, cache, rt),
                layer_adapter=job.experts.layer_adapter if job.experts else None,
            )
        _embed(reader, adapter, ids, cache, rt)
        bar = tqdm(range(adapter.num_layers), desc="blocks", unit="block", disable=not rt.progress, dynamic_ncols=True)
        for i in bar:
            if i in job.removed:
                continue  # the block's inputs stay the next block's inputs
            entry = _process_block(i, cfg, reader, adapter, writer, cache, rt, job)
            report.add_block(entry)
            err = entry.get("output_error")
            bar.set_postfix(peak_rss=f"{memory.peak_rss_mb():.0f}MB", err="-" if err is None else f"{err:.3g}")
            cache.swap()
    report.finish(time.perf_counter() - t_start, reader=reader)
    if job.allocation is not None:
        report.data["allocation"] = job.allocation.report()
    if not rt.dist.is_main:
        dist.barrier(rt.dist)  # rank 0 finalizes; every rank returns once the checkpoint is complete
        return report.data
    alloc_over, alloc_layers = job.allocation.output_overrides() if job.allocation else ({}, {})
    overrides = {**(job.plan.overrides if job.plan else {}), **es.output_overrides(job.experts), **alloc_over}
    out_config = output_config(dict(reader.config), overrides, job.removed)
    extra = {"blockprune_recipe.yaml": config_to_yaml(cfg), "blockprune_report.json": report.to_json()}
    if job.sublayers or es.is_nonuniform(job.experts) or alloc_layers:
        entries = es.layer_entries(job.experts, _layer_entries(job, adapter.num_layers))
        out_config, modeling = nonuniform_config(out_config, entries)
        extra[MODELING_FILE] = modeling
    writer.finalize(out_config, source_dir=cfg.model, extra_files=extra)
    if cfg.report_plots:
        from engine.report.render import write_report_files

        write_report_files(cfg.output, report.data)
    log.info("wrote %s (%.1f s, peak RSS %.0f MB)", cfg.output, report.wall_time_s, memory.peak_rss_mb())
    dist.barrier(rt.dist)
    return report.data


def output_run_id(cfg: RunConfig, reader: CheckpointReader, info: DistInfo) -> str:
    """What a resumed run must match (stored in the writer's manifest): the recipe's output-determining keys
    (`RunConfig.run_id`), the input checkpoint's fingerprint and the world size (the bytes depend on the
    reduction order, docs/distributed.md)."""
    import hashlib

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


def make_job(cfg: RunConfig, adapter: ArchAdapter, src_config: dict) -> Job:
    """The structured plan and the adapter of the shrunk blocks; ConfigError (before any weight is read) when the
    plan cannot be met or the output config cannot be renumbered for depth removal."""
    job = Job(structured=_stage_of(cfg, StructuredStage), experts=es.make_experts_job(cfg, adapter))
    depth = _stage_of(cfg, DepthStage)
    if depth is not None and depth.by == "block":
        output_config(dict(src_config), {}, list(range(depth.remove)))
    if depth is not None and depth.by == "sublayer":
        if job.structured is not None:
            raise ConfigError("prune: depth by sublayer and structured stages cannot share a run yet")
        if depth.remove > 2 * adapter.num_layers - 1:
            raise ConfigError(f"depth.remove = {depth.remove}: the model has only {2 * adapter.num_layers} sublayers")
    job.allocation = alloc_mod.make_allocation(cfg, adapter)
    if job.structured is not None and not (job.allocation and job.allocation.coordinated):
        job.plan = st_mod.plan_uniform(adapter, job.allocation.effective_stage() if job.allocation else job.structured)
        job.layer_adapter = ArchAdapter(adapter.spec, st_mod.shrunk_config(adapter.config, job.plan.overrides))
    return job


@torch.no_grad()
def _depth_scoring_pass(
    reader: CheckpointReader, adapter: ArchAdapter, cache: ActivationCache, rt: Runtime, by: str
) -> list[dict[str, float]]:
    """Dense propagation through every block, one in memory at a time. Per block: "block" = block influence
    `1 - mean_t cos(x_in_t, x_out_t)` over all calibration tokens (ShortGPT); with `by: sublayer` also "attention" /
    "mlp" = `Σ‖y − y_ref‖² / Σ‖y_ref‖²`, the change of the block's output when that sublayer is an identity."""
    out = []
    for i in range(adapter.num_layers):
        disk = reader.read(reader.names_with_prefix(adapter.block_prefix(i)), device=rt.device)
        block = adapter.build_block(i, disk, device=rt.device, dtype=rt.dtype)
        del disk
        sums = {"block": 0.0, "tokens": 0.0, "attention": 0.0, "mlp": 0.0, "ref": 0.0}
        ctxs: dict[int, dict] = {}
        for b in range(cache.num_batches()):
            x = cache.get(b)
            ctx = ctxs.get(x.shape[0])
            if ctx is None:
                ctx = ctxs[x.shape[0]] = adapter.forward_context(
                    x.shape[0], x.shape[1], device=rt.device, dtype=rt.dtype
                )
            y = adapter.block_forward(block, x, ctx)
            n = x.shape[0] * x.shape[1]
            sums["block"] += block_influence(x, y) * n
            sums["tokens"] += n
            if by == "sublayer":
                sums["ref"] += float(y.double().square().sum())
                for part in ("attention", "mlp"):
                    y_wo = _without(adapter, block, part, x, ctx)
                    sums[part] += float((y_wo.double() - y.double()).square().sum())
            cache.put(b, y)
        sums = dict(zip(sums, dist.all_reduce_floats(list(sums.values()), rt.dist)))
        scores = {"block": sums["block"] / sums["tokens"]}
        if by == "sublayer":
            scores.update({p: sums[p] / max(sums["ref"], 1e-30) for p in ("attention", "mlp")})
        out.append(scores)
        cache.swap()
        _free(block)
    return out


def _without(adapter: ArchAdapter, block, part: str, x: torch.Tensor, ctx: dict) -> torch.Tensor:
    """The block's output with sublayer `part` an identity (modules swapped in and restored)."""
    saved = {n: getattr(block, n) for n in ("self_attn", "input_layernorm", "mlp", "post_attention_layernorm")}
    layer_idx = block.self_attn.layer_idx
    try:
        remove_sublayers(block, attention=part != "attention", mlp=part != "mlp")
        mask = ctx["attention_masks"][adapter.layer_type(layer_idx)]
        return block(
            x, attention_mask=mask, position_ids=ctx["position_ids"], position_embeddings=ctx["position_embeddings"]
        )
    finally:
        for n, m in saved.items():
            setattr(block, n, m)


def _plan_depth(depth: DepthStage, job: Job, scores: list[dict[str, float]]) -> dict:
    """Choose what to remove (lowest scores; ties: lower index) and return the report section."""
    job.influence = [s["block"] for s in scores]
    section: dict = {"by": depth.by, "block_influence": [round(v, 6) for v in job.influence]}
    if depth.by == "block":
        order = sorted(range(len(scores)), key=lambda i: (job.influence[i], i))
        job.removed = sorted(order[: depth.remove])
        section["removed"] = job.removed
        log.info("depth: removing blocks %s", job.removed)
        return section
    cands = sorted((s[p], i, p) for i, s in enumerate(scores) for p in ("attention", "mlp"))
    for _, i, p in cands[: depth.remove]:
        job.sublayers.setdefault(i, {"attention": True, "mlp": True})[p] = False
    section["output_change"] = [{p: round(s[p], 6) for p in ("attention", "mlp")} for s in scores]
    section["removed_sublayers"] = [[i, p] for _, i, p in sorted(cands[: depth.remove], key=lambda c: c[1:])]
    log.info("depth: removing sublayers %s", section["removed_sublayers"])
    return section


def _layer_entries(job: Job, num_layers: int) -> list[dict]:
    """The `blockprune.layers` entries of the output layers (kept sublayers; widths are the stock fields)."""
    kept = kept_layers(num_layers, job.removed)
    entries = [
        {
            "attention": job.sublayers.get(i, {}).get("attention", True),
            "mlp": job.sublayers.get(i, {}).get("mlp", True),
            "config": {},
        }
        for i in kept
    ]
    return job.allocation.layer_entries(entries, kept) if job.allocation else entries  # per-layer widths


def _build(adapter: ArchAdapter, i: int, disk: dict[str, torch.Tensor], job: Job, rt: Runtime):
    """Block `i` of the written shapes from its disk tensors; removed sublayers are identities with no tensors."""
    keep = job.sublayers.get(i)
    if keep is None:
        return adapter.build_block(i, disk, device=rt.device, dtype=rt.dtype)
    from engine.blocks import (
        DISK_LAYOUT_ATTR,
        build_meta_block,
        cast_state,
        check_shapes,
        disk_to_memory_state,
        load_assign,
    )

    prefix = adapter.block_prefix(i)
    meta = remove_sublayers(build_meta_block(adapter.spec, adapter.config, i), **keep)
    state, layout = disk_to_memory_state(disk, prefix, meta, adapter.spec)
    check_shapes(state, meta, prefix, layout)
    block = load_assign(meta, cast_state(state, adapter.spec, device=rt.device, dtype=rt.dtype), prefix)
    setattr(block, DISK_LAYOUT_ATTR, layout)
    return block


def _renumber(tensors: dict[str, torch.Tensor], old_prefix: str, new_prefix: str) -> dict[str, torch.Tensor]:
    if old_prefix == new_prefix:
        return tensors
    return {new_prefix + n[len(old_prefix) :]: t for n, t in tensors.items()}


def _copy_non_block(reader: CheckpointReader, adapter: ArchAdapter, writer: RankWriter) -> None:
    """Embeddings, final norm and lm_head are copied through unpruned (byte-identical), by rank 0."""
    if writer.is_committed(NON_BLOCK_UNIT) or writer.writer is None:
        return
    names = adapter.non_block_keys(reader.names())
    writer.write_unit(NON_BLOCK_UNIT, reader.read(names))


def _embed(reader: CheckpointReader, adapter: ArchAdapter, ids: torch.Tensor, cache: ActivationCache, rt: Runtime):
    W = reader.read([adapter.embed_key], device=rt.device, dtype=rt.dtype)[adapter.embed_key]
    mb = rt.micro_batch
    for b in range(cache.num_batches()):
        cache.put(b, F.embedding(ids[b * mb : (b + 1) * mb].to(rt.device), W))
    del W
    cache.swap()


# --------------------------------------------------------------------------------------------- one block


def _process_block(
    i: int,
    cfg: RunConfig,
    reader: CheckpointReader,
    adapter: ArchAdapter,
    writer: RankWriter,
    cache: ActivationCache,
    rt: Runtime,
    job: Job | None = None,
) -> dict:
    """Block `i` (source numbering) -> output block `j` (after depth removal); written under unit `block.j`."""
    job = job or Job()
    j = job.out_index(i, adapter.num_layers)
    # builds blocks of the written (shrunk) shapes, source numbering
    decision = job.allocation.decide(i) if job.allocation else None  # this layer's share of a global budget
    out_adapter = (
        job.experts.layer_adapter(i)
        if job.experts
        else ((job.allocation and job.allocation.layer_adapter(decision)) or job.layer_adapter or adapter)
    )
    stages = job.allocation.stages(decision, cfg.prune) if job.allocation else cfg.prune
    unit = block_unit(j)
    t0 = time.perf_counter()
    memory.reset_device_peak(rt.device)
    if writer.is_committed(unit):  # resume: rebuild the activations from the block already written
        disk = _renumber(writer.read_unit(unit, device=rt.device), adapter.block_prefix(j), adapter.block_prefix(i))
        block = _build(out_adapter, i, disk, job, rt)
        _forward_all(adapter, block, cache, rt)
        entry = dict(writer.unit_metadata(unit))
        entry["resumed"] = True
        if job.allocation is not None and decision is not None:
            entry["allocation"] = job.allocation.record(i, entry, decision)
        _free(block)
        return entry

    disk = reader.read(reader.names_with_prefix(adapter.block_prefix(i)), device=rt.device)
    src_dtypes = {n: t.dtype for n, t in disk.items()}
    block = adapter.build_block(i, disk, device=rt.device, dtype=rt.dtype)
    del disk
    if i in job.sublayers:
        remove_sublayers(block, **job.sublayers[i])
    specs = adapter.linears(block, i) if i not in job.sublayers else []
    plan = plan_block(adapter, specs, stages)
    if job.structured is not None:
        _plan_structured_inputs(adapter, block, i, job.structured, plan)

    t_stats = time.perf_counter()
    if _true_sequential_ok(cfg, job, adapter, block, i, plan, cache, rt):
        return _finish_true_sequential(
            i,
            j,
            unit,
            adapter,
            out_adapter,
            block,
            specs,
            plan,
            cache,
            rt,
            writer,
            job,
            decision,
            src_dtypes,
            t0,
            t_stats,
        )
    with es.routing_stats(job.experts, block) as routing:  # MoE routing sums for the experts stage
        stats = _collect_stats(adapter, block, specs, plan, cache, rt)  # dense forward; dense outputs -> cache
    if routing:  # plain sums: every rank gets the routing counts of all calibration tokens
        dist.all_reduce_sum([routing[k] for k in sorted(routing)], rt.dist)
    t_solve = time.perf_counter()
    moe = {}
    if job.experts is not None:  # remove experts, then the unstructured stages act on the survivors
        block, stats, moe = es.prune_experts(job.experts, adapter, block, i, stats, routing)
        specs = out_adapter.linears(block, i)
        plan = plan_block(out_adapter, specs, stages)
    linears = _solve_block(adapter, block, specs, plan, stats, rt.dist)
    records = None
    if job.structured is not None:
        old = block
        block, records = st_mod.prune_block(
            adapter,
            old,
            i,
            job.structured,
            decision or job.plan,
            stats,
            out_adapter,
            run_all=lambda t, c, f: run_sharded(t, c, f, rt.dist),
        )
        del old
    del stats
    t_fwd = time.perf_counter()
    if job.structured is not None and job.structured.bias_compensation:
        src_dtypes = _dtypes_for(block, out_adapter, i, src_dtypes)
    writer_tensors = out_adapter.block_to_disk(i, block, src_dtypes)
    if any(t.dtype != rt.dtype for t in writer_tensors.values() if t.is_floating_point()):
        # propagate with the weights exactly as written (rounded to the checkpoint's dtype), so that the next block
        # sees what the saved model computes and a resumed run (which reads them back) is bit-identical
        _free(block)
        block = _build(out_adapter, i, writer_tensors, job, rt)
    out_err = None
    if cfg.sequential and (plan.stages or records or moe):
        out_err = _forward_all(adapter, block, cache, rt, compare=True)
    writer_tensors = _renumber(writer_tensors, adapter.block_prefix(i), adapter.block_prefix(j))
    t_write = time.perf_counter()
    entry = {
        "block": i,
        **({"output_block": j, "structured": records} if job.structured or job.removed else {}),
        **({"sublayers": job.sublayers[i]} if i in job.sublayers else {}),
        **({"experts": moe} if moe else {}),
        "linears": linears,
        "output_error": out_err,
        "time_s": {
            "load": round(t_stats - t0, 4),
            "stats": round(t_solve - t_stats, 4),
            "solve": round(t_fwd - t_solve, 4),
            "forward": round(t_write - t_fwd, 4),
        },
    }
    entry = _write_block(i, unit, entry, writer_tensors, writer, job, decision, rt, t0, t_write)
    del writer_tensors
    _free(block)
    return entry


_DECOMPOSITION_OK: dict[type, bool] = {}  # block class -> its pieces compose to its forward (checked once per process)


def _true_sequential_ok(
    cfg: RunConfig, job: Job, adapter: ArchAdapter, block, i: int, plan: BlockPlan, cache: ActivationCache, rt: Runtime
) -> bool:
    """Whether block `i` takes the one-pass true-sequential path (`engine.sequential`): `true_sequential` and
    `sequential` on, only unstructured stages (no structured, experts or sublayer removal), a dense GQA block whose
    pieces compose to its forward, and the held intermediates fit beside the activation cache."""
    if (
        not (cfg.true_sequential and cfg.sequential and plan.stages)
        or job.structured is not None
        or job.experts is not None
        or i in job.sublayers
        or seq_mod.parts_of(adapter, block) is None
    ):
        return False
    tokens = cache.shape[0] * cache.shape[1]
    core, _ = seq_mod.side_bytes(adapter, block, tokens, rt.dtype)
    fits = cache.tier != "disk" and core <= _side_budget(cache, rt)
    ok = _DECOMPOSITION_OK.get(type(block))
    if ok is None:
        x = cache.get(0)[:1]
        ctx = adapter.forward_context(1, x.shape[1], device=rt.device, dtype=rt.dtype)
        ok = seq_mod.decomposition_matches(adapter, block, x, ctx)
        if rt.dist.enabled:  # every rank takes the same path
            ok = dist.all_reduce_floats([float(ok)], rt.dist)[0] == rt.dist.world_size
        _DECOMPOSITION_OK[type(block)] = ok
    if rt.dist.enabled:
        fits = dist.all_reduce_floats([float(fits)], rt.dist)[0] == rt.dist.world_size
    if ok and not fits:
        log.info(
            "block %d: the true-sequential intermediates (%.0f MiB) do not fit beside the activation cache; "
            "two forwards instead",
            i,
            core / 2**20,
        )
    return ok and fits


def _side_budget(cache: ActivationCache, rt: Runtime) -> int:
    """Bytes left in the cache's memory tier for the true-sequential intermediates."""
    budget = rt.device_budget if cache.tier == "device" else rt.host_budget
    return (2**62 if budget is None else budget) - cache.nbytes()


def _finish_true_sequential(
    i: int,
    j: int,
    unit: str,
    adapter: ArchAdapter,
    out_adapter: ArchAdapter,
    block,
    specs: list[LinearSpec],
    plan: BlockPlan,
    cache: ActivationCache,
    rt: Runtime,
    writer: RankWriter,
    job: Job,
    decision,
    src_dtypes: dict[str, torch.dtype],
    t0: float,
    t_stats: float,
) -> dict:
    """Block `i` through `engine.sequential.run`, then written like `_process_block` does."""
    widths = {s.input_id: s.d_in for s in specs}
    wanted = plan.gram_inputs | plan.moment_inputs
    ctxs: dict[int, dict] = {}
    solve_s = [0.0]
    prefix = adapter.block_prefix(i)

    def ctx_for(batch: int) -> dict:
        if batch not in ctxs:
            ctxs[batch] = adapter.forward_context(batch, cache.shape[1], device=rt.device, dtype=rt.dtype)
        return ctxs[batch]

    def gather(input_id: str, feed) -> dict:
        if input_id not in wanted:
            feed(None)
            return {}
        st = init_stats(
            widths[input_id],
            device=rt.device,
            dtype=torch.float32,
            gram=input_id in plan.gram_inputs,
            track_moments=input_id in plan.track_inputs,
        )
        feed(lambda X: accumulate(st, X))
        return reduce_stats({input_id: st}, rt.dist, rt.device)

    def solve(group: list[LinearSpec], stats: dict) -> dict:
        t = time.perf_counter()
        out = _solve_block(adapter, block, group, plan, stats, rt.dist)
        for spec in group:  # propagate with the weights as written (see _process_block)
            disk = src_dtypes.get(f"{prefix}{spec.name}.weight")
            W = adapter.get_weight(block, spec)
            if spec.name in out and disk is not None and disk != W.dtype:
                adapter.set_weight(block, spec, W.to(disk).to(W.dtype))
        solve_s[0] += time.perf_counter() - t
        return out

    tokens = cache.shape[0] * cache.shape[1]
    _, mlp_hidden = seq_mod.side_bytes(adapter, block, tokens, rt.dtype)
    side_device = cache.device if cache.tier == "device" else torch.device("cpu")
    linears, (num, den) = seq_mod.run(
        adapter,
        block,
        specs,
        cache,
        ctx_for,
        gather,
        solve,
        keep_mlp_hidden=mlp_hidden <= _side_budget(cache, rt),
        side_device=side_device,
    )
    num, den = dist.all_reduce_floats([num, den], rt.dist)
    writer_tensors = _renumber(out_adapter.block_to_disk(i, block, src_dtypes), prefix, adapter.block_prefix(j))
    t_write = time.perf_counter()
    pass_s = t_write - t_stats
    entry = {
        "block": i,
        "linears": linears,
        "output_error": num / den if den > 0 else None,
        "output_error_on": "first sample",  # the one-pass path never computes the dense outputs of all samples
        "true_sequential": True,
        "time_s": {
            "load": round(t_stats - t0, 4),
            "stats": round(pass_s - solve_s[0], 4),
            "solve": round(solve_s[0], 4),
            "forward": 0.0,
        },
    }
    entry = _write_block(i, unit, entry, writer_tensors, writer, job, decision, rt, t0, t_write)
    del writer_tensors
    _free(block)
    return entry


def _write_block(
    i: int,
    unit: str,
    entry: dict,
    writer_tensors: dict[str, torch.Tensor],
    writer: RankWriter,
    job: Job,
    decision,
    rt: Runtime,
    t0: float,
    t_write: float,
) -> dict:
    """Complete block `i`'s report entry (memory, sizes, its allocation record), write the block as `unit` with
    it, and add the write and total times."""
    entry.update(
        {
            "peak_rss_mb": round(memory.peak_rss_mb(), 1),  # process peak so far (monotone)
            "rss_mb": round(memory.rss_mb(), 1),
            "peak_device_mb": memory.device_peak_mb(rt.device),
            "params": sum(int(t.numel()) for t in writer_tensors.values()),
            "nonzero": sum(int(torch.count_nonzero(t)) for t in writer_tensors.values()),
        }
    )
    if job.allocation is not None and decision is not None:
        entry["allocation"] = job.allocation.record(i, entry, decision)
    writer.write_unit(unit, writer_tensors, metadata=entry)
    entry["time_s"]["write"] = round(time.perf_counter() - t_write, 4)
    entry["time_s"]["total"] = round(time.perf_counter() - t0, 4)
    return entry


def _plan_structured_inputs(adapter: ArchAdapter, block, i: int, stage: StructuredStage, plan: BlockPlan) -> None:
    """The consumers' inputs need sums and squares always (fluctuation, Wanda norms, bias compensation) and the
    Gram for the OBS score or any reconstruction."""
    inputs = st_mod.consumer_inputs(adapter, block, i, stage.units)
    if st_mod.needs_gram(stage):
        plan.gram_inputs |= inputs
    else:
        plan.moment_inputs |= inputs
    plan.moment_inputs -= plan.gram_inputs
    plan.track_inputs |= inputs


def _dtypes_for(block, out_adapter: ArchAdapter, i: int, src: dict[str, torch.dtype]) -> dict[str, torch.dtype]:
    """Disk dtypes of the written tensors: the source's; a tensor the source lacks (a compensation bias) takes
    the dtype of its weight."""
    names = out_adapter.block_to_disk(i, block).keys()
    out = dict(src)
    for n in names:
        if n not in out:
            w = n[: -len("bias")] + "weight"
            if w in src:
                out[n] = src[w]
    return out


def _collect_stats(
    adapter: ArchAdapter, block, specs: list[LinearSpec], plan: BlockPlan, cache: ActivationCache, rt: Runtime
) -> dict[str, InputStats]:
    """One dense forward over all micro-batches: accumulate the statistics each input needs, and write the dense
    block outputs into the cache (the next block's inputs when `sequential: false`, the reference otherwise)."""
    widths = {s.input_id: s.d_in for s in specs}
    stats: dict[str, InputStats] = {}
    wanted = plan.gram_inputs | plan.moment_inputs

    def on_input(input_id: str, X: torch.Tensor) -> None:
        if input_id not in wanted:
            return
        st = stats.get(input_id)
        if st is None:
            st = stats[input_id] = init_stats(
                widths[input_id],
                device=X.device,
                dtype=torch.float32,
                gram=input_id in plan.gram_inputs,
                track_moments=input_id in plan.track_inputs,
            )
        accumulate(st, X)

    hooks = adapter.input_hooks(block, on_input) if wanted else contextlib.nullcontext()
    with hooks:
        _forward_all(adapter, block, cache, rt)
    return reduce_stats(stats, rt.dist, rt.device)


def _solve_block(
    adapter: ArchAdapter,
    block,
    specs: list[LinearSpec],
    plan: BlockPlan,
    stats: dict[str, InputStats],
    info: DistInfo | None = None,
) -> dict[str, dict]:
    """Prune every planned linear. Linears that read the same input under the same SparseGPT stages (q/k/v,
    gate/up) are solved together: one factorisation of H and one column loop, same result as one by one.
    With several ranks each matrix is solved by one owner rank (by estimated cost) and broadcast."""
    out: dict[str, dict] = {}
    groups: dict[tuple, list[LinearSpec]] = {}
    # with several ranks, every matrix is its own task (the same result: each matrix of a group selects among its
    # own rows), so that a group's matrices (q | k, v; gate | up) are solved on different ranks at once
    several = info is not None and info.enabled and info.world_size > 1
    for spec in specs:
        stages = plan.stages.get(spec.name)
        if stages:
            shared = not several and all(s.method == "sparsegpt" for s in stages) and spec.input_id in stats
            key = (spec.input_id, tuple(id(s) for s in stages)) if shared else (spec.name,)
            groups.setdefault(key, []).append(spec)

    def solve(group: list[LinearSpec]) -> list[tuple[torch.Tensor, dict]]:
        stages = plan.stages[group[0].name]
        st = stats.get(group[0].input_id)
        W0s = [adapter.get_weight(block, spec) for spec in group]
        Ws = [W0.float() for W0 in W0s]
        for stage in stages:
            Ws = _apply_stage(stage, Ws, st, group)
        return [(W.to(W0.dtype), _linear_record(W0, W, st, stages)) for W0, W in zip(W0s, Ws)]

    tasks = list(groups.values())
    results = run_sharded(tasks, [_solve_cost(g, plan) for g in tasks], solve, info or DistInfo())
    for group, result in zip(tasks, results):
        for spec, (W, rec) in zip(group, result):
            out[spec.name] = rec
            adapter.set_weight(block, spec, W.to(adapter.get_weight(block, spec).device))
    return out


def _solve_cost(group: list[LinearSpec], plan: BlockPlan) -> float:
    """Estimated flops of solving `group`: SparseGPT ~ d_in³ (factorisation) + d_out·d_in² (column loop) per
    stage; Wanda / magnitude ~ d_out·d_in."""
    cost = 0.0
    for stage in plan.stages[group[0].name]:
        d_in = group[0].d_in
        if stage.method == "sparsegpt":
            cost += d_in**3 + sum(s.d_out for s in group) * d_in**2
        else:
            cost += sum(s.d_out for s in group) * d_in
    return cost


def _apply_stage(stage, Ws: list[torch.Tensor], st: InputStats | None, group: list[LinearSpec]) -> list[torch.Tensor]:
    s, pattern = stage.effective_sparsity, stage.pattern
    if len(Ws) > 1:  # a shared-input SparseGPT group
        return [r.weight for r in sparsegpt_prune_many(Ws, st.H, s, pattern=pattern, n_tokens=st.n, **_options(stage))]
    if st is None and stage.method != "magnitude":  # an expert that received no calibration token
        log.warning("%s: no calibration tokens reached this linear; using magnitude", group[0].name)
        return [get_solver("magnitude")(Ws[0], None, s, pattern).weight]
    return [get_solver(stage.method)(Ws[0], st, s, pattern, **_options(stage)).weight]


def _linear_record(W0: torch.Tensor, W: torch.Tensor, st: InputStats | None, stages: list) -> dict:
    rec = {
        "sparsity": round(float((W == 0).float().mean()), 6),
        "zeros": int((W == 0).sum()),
        "shape": list(W.shape),
        "planned": max(s.effective_sparsity for s in stages),
    }
    if st is not None and st.H is not None:
        base = layer_error(torch.zeros_like(W), W0.float(), st.H)
        rec["error"] = float(layer_error(W0.float(), W, st.H) / max(base, 1e-30))
    return rec


def _options(stage) -> dict:
    if stage.method == "sparsegpt":
        return {"blocksize": stage.blocksize, "percdamp": stage.percdamp}
    return {}


@torch.no_grad()
def _forward_all(adapter: ArchAdapter, block, cache: ActivationCache, rt: Runtime, compare: bool = False):
    """Run `block` over every micro-batch of the cache's inputs into its outputs. With `compare`, the outputs
    already there (the dense block's) are the reference: returns the relative output error
    sum ||y - y_dense||^2 / sum ||y_dense||^2."""
    ctxs: dict[int, dict] = {}
    num = den = 0.0
    for b in range(cache.num_batches()):
        x = cache.get(b)
        ctx = ctxs.get(x.shape[0])
        if ctx is None:
            ctx = ctxs[x.shape[0]] = adapter.forward_context(x.shape[0], x.shape[1], device=rt.device, dtype=rt.dtype)
        y = adapter.block_forward(block, x, ctx)
        if compare:
            ref = cache.get_output(b).float()
            num += float((y.float() - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
        cache.put(b, y)
    if compare:
        num, den = dist.all_reduce_floats([num, den], rt.dist)
    return num / den if compare and den > 0 else None


def _free(block) -> None:
    """Release the device cache after a block (its tensors go with the caller's last reference; a full
    `gc.collect()` here cost 0.2 s a block and freed nothing: blocks hold no reference cycles)."""
    del block
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
