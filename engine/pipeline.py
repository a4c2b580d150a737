"""The block loop (DESIGN.md §2): one transformer block on the device at a time.

    reader -> embed(ids) -> for each block: load -> statistics (one dense forward with input hooks)
           -> solve every selected linear -> forward the pruned block (sequential) -> write -> free
    -> finalize (config, tokenizer files, recipe, report; the index last)

Nothing here holds more than one block's weights, its input statistics and the calibration activations.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engine import memory
from engine.arch import ArchAdapter, LinearSpec, adapter_for
from engine.cache import ActivationCache, default_budgets
from engine.calibration import load_calibration
from engine.config import ConfigError, RunConfig, config_to_yaml, name_selected, parse_nm, parse_size
from engine.report import RunReport
from sharding.reader import CheckpointReader
from sharding.writer import CheckpointWriter
from solvers.registry import get_solver, needs_gram
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


@dataclass
class BlockPlan:
    """Which stages prune which linears of one block, and what statistics that needs per input."""

    stages: dict[str, list] = field(default_factory=dict)  # linear name -> stages in order
    gram_inputs: set[str] = field(default_factory=set)  # input ids that need the full Gram
    moment_inputs: set[str] = field(default_factory=set)  # input ids that need only column norms


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
    gb = 2**30
    dev_default, host_default = default_budgets(device)
    return Runtime(
        device=device,
        dtype=dtype,
        micro_batch=rt.micro_batch,
        device_budget=int(rt.device_budget_gb * gb) if rt.device_budget_gb is not None else dev_default,
        host_budget=int(rt.host_budget_gb * gb) if rt.host_budget_gb is not None else host_default,
        spill_dir=rt.spill_dir or cfg.output,
        progress=rt.progress,
    )


def _checkpoint_dtype(reader: CheckpointReader) -> torch.dtype:
    floats = [reader.torch_dtype(n) for n in reader.names() if reader.torch_dtype(n).is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def plan_block(adapter: ArchAdapter, specs: list[LinearSpec], stages: list) -> BlockPlan:
    plan = BlockPlan()
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
        chosen = [s for s in specs if name_selected(s.name, stage.targets, stage.ignore)]
        if not chosen:
            names = ", ".join(sorted({s.name for s in specs})[:12])
            raise ConfigError(f"prune[{k}]: targets {stage.targets} (ignore {stage.ignore}) select no linear; names: {names}")
        nm = parse_nm(stage.pattern, f"prune[{k}]")
        if nm is not None:
            bad = [s.name for s in chosen if s.d_in % nm[1]]
            if bad:
                raise ConfigError(f"prune[{k}]: pattern {stage.pattern} needs input widths divisible by {nm[1]}: {bad[0]}")


def check_output(cfg: RunConfig) -> None:
    """Fail before any work when the output cannot be written (the writer checks again when it opens it)."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"output {out} is not empty; pass --overwrite to replace it or --resume to continue it")
    if out.resolve() == Path(cfg.model).resolve():
        raise ConfigError(f"output {out} is the input model directory")


# --------------------------------------------------------------------------------------------- the run


def run(cfg: RunConfig) -> dict:
    """Prune `cfg.model` into `cfg.output`; returns the report (also written as blockprune_report.json)."""
    t_start = time.perf_counter()
    reader = CheckpointReader(cfg.model)
    adapter = adapter_for(reader.config)
    validate_against_model(cfg, adapter)
    check_output(cfg)
    rt = resolve_runtime(cfg, reader)
    log.info("blockprune: %s (%s, %d blocks) -> %s on %s/%s", cfg.model, adapter.model_type, adapter.num_layers,
             cfg.output, rt.device, str(rt.dtype).replace("torch.", ""))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    ids = load_calibration(cfg.calibration, tokenizer)
    writer = CheckpointWriter(cfg.output, max_shard_size=parse_size(cfg.max_shard_size), overwrite=cfg.overwrite,
                              resume=cfg.resume, run_id=cfg.run_id())
    report = RunReport.start(cfg, adapter, rt)

    _copy_non_block(reader, adapter, writer)
    hidden = adapter.config.hidden_size
    with ActivationCache(ids.shape[0], ids.shape[1], hidden, dtype=rt.dtype, device=rt.device,
                         micro_batch=rt.micro_batch, device_budget_bytes=rt.device_budget,
                         host_budget_bytes=rt.host_budget, spill_dir=rt.spill_dir) as cache:
        report.cache_tier = cache.tier
        _embed(reader, adapter, ids, cache, rt)
        bar = tqdm(range(adapter.num_layers), desc="blocks", unit="block", disable=not rt.progress, dynamic_ncols=True)
        for i in bar:
            entry = _process_block(i, cfg, reader, adapter, writer, cache, rt)
            report.add_block(entry)
            err = entry.get("output_error")
            bar.set_postfix(peak_rss=f"{memory.peak_rss_mb():.0f}MB", err="-" if err is None else f"{err:.3g}")
            cache.swap()
    report.finish(time.perf_counter() - t_start, reader=reader)
    writer.finalize(
        dict(reader.config),
        source_dir=cfg.model,
        extra_files={"blockprune_recipe.yaml": config_to_yaml(cfg), "blockprune_report.json": report.to_json()},
    )
    if cfg.report_plots:
        from engine.report_render import write_report_files

        write_report_files(cfg.output, report.data)
    log.info("wrote %s (%.1f s, peak RSS %.0f MB)", cfg.output, report.wall_time_s, memory.peak_rss_mb())
    return report.data


def prune(model_dir: str | Path, config: RunConfig | dict) -> dict:
    """Library verb: prune `model_dir` with `config` (a RunConfig, or a recipe dict whose `model` may be omitted)."""
    from engine.config import config_from_dict

    if isinstance(config, dict):
        config = config_from_dict({**config, "model": str(model_dir)})
    else:
        config.model = str(model_dir)
    return run(config)


def _copy_non_block(reader: CheckpointReader, adapter: ArchAdapter, writer: CheckpointWriter) -> None:
    """Embeddings, final norm and lm_head are copied through unpruned (byte-identical)."""
    if writer.is_committed(NON_BLOCK_UNIT):
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


def _process_block(i: int, cfg: RunConfig, reader: CheckpointReader, adapter: ArchAdapter,
                   writer: CheckpointWriter, cache: ActivationCache, rt: Runtime) -> dict:
    unit = block_unit(i)
    t0 = time.perf_counter()
    memory.reset_device_peak(rt.device)
    if writer.is_committed(unit):  # resume: rebuild the activations from the block already written
        block = adapter.build_block(i, writer.read_unit(unit, device=rt.device), device=rt.device, dtype=rt.dtype)
        _forward_all(adapter, block, cache, rt)
        entry = dict(writer.unit_metadata(unit))
        entry["resumed"] = True
        _free(block)
        return entry

    disk = reader.read(reader.names_with_prefix(adapter.block_prefix(i)), device=rt.device)
    src_dtypes = {n: t.dtype for n, t in disk.items()}
    block = adapter.build_block(i, disk, device=rt.device, dtype=rt.dtype)
    del disk
    specs = adapter.linears(block, i)
    plan = plan_block(adapter, specs, cfg.prune)

    t_stats = time.perf_counter()
    stats = _collect_stats(adapter, block, specs, plan, cache, rt)  # dense forward; dense outputs -> cache
    t_solve = time.perf_counter()
    linears = _solve_block(adapter, block, specs, plan, stats)
    del stats
    t_fwd = time.perf_counter()
    writer_tensors = adapter.block_to_disk(i, block, src_dtypes)
    if any(t.dtype != rt.dtype for t in writer_tensors.values() if t.is_floating_point()):
        # propagate with the weights exactly as written (rounded to the checkpoint's dtype), so that the next block
        # sees what the saved model computes and a resumed run (which reads them back) is bit-identical
        _free(block)
        block = adapter.build_block(i, writer_tensors, device=rt.device, dtype=rt.dtype)
    out_err = None
    if cfg.sequential and plan.stages:
        out_err = _forward_all(adapter, block, cache, rt, compare=True)
    t_write = time.perf_counter()
    entry = {
        "block": i,
        "linears": linears,
        "output_error": out_err,
        "time_s": {
            "load": round(t_stats - t0, 4),
            "stats": round(t_solve - t_stats, 4),
            "solve": round(t_fwd - t_solve, 4),
            "forward": round(t_write - t_fwd, 4),
        },
        "peak_rss_mb": round(memory.peak_rss_mb(), 1),  # process peak so far (monotone)
        "rss_mb": round(memory.rss_mb(), 1),
        "peak_device_mb": memory.device_peak_mb(rt.device),
        "params": sum(int(t.numel()) for t in writer_tensors.values()),
        "nonzero": sum(int(torch.count_nonzero(t)) for t in writer_tensors.values()),
    }
    writer.write_unit(unit, writer_tensors, metadata=entry)
    entry["time_s"]["write"] = round(time.perf_counter() - t_write, 4)
    entry["time_s"]["total"] = round(time.perf_counter() - t0, 4)
    del writer_tensors
    _free(block)
    return entry


def _collect_stats(adapter: ArchAdapter, block, specs: list[LinearSpec], plan: BlockPlan,
                   cache: ActivationCache, rt: Runtime) -> dict[str, InputStats]:
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
            st = stats[input_id] = init_stats(widths[input_id], device=X.device, dtype=torch.float32,
                                              gram=input_id in plan.gram_inputs)
        accumulate(st, X)

    hooks = adapter.input_hooks(block, on_input) if wanted else contextlib.nullcontext()
    with hooks:
        _forward_all(adapter, block, cache, rt)
    return stats


def _solve_block(adapter: ArchAdapter, block, specs: list[LinearSpec], plan: BlockPlan,
                 stats: dict[str, InputStats]) -> dict[str, dict]:
    """Prune every planned linear. Linears that read the same input under the same SparseGPT stages (q/k/v,
    gate/up) are solved together: one factorisation of H and one column loop, same result as one by one."""
    out: dict[str, dict] = {}
    groups: dict[tuple, list[LinearSpec]] = {}
    for spec in specs:
        stages = plan.stages.get(spec.name)
        if stages:
            shared = all(s.method == "sparsegpt" for s in stages) and spec.input_id in stats
            key = (spec.input_id, tuple(id(s) for s in stages)) if shared else (spec.name,)
            groups.setdefault(key, []).append(spec)
    for group in groups.values():
        stages = plan.stages[group[0].name]
        st = stats.get(group[0].input_id)
        W0s = [adapter.get_weight(block, spec) for spec in group]
        Ws = [W0.float() for W0 in W0s]
        for stage in stages:
            Ws = _apply_stage(stage, Ws, st, group)
        for spec, W0, W in zip(group, W0s, Ws):
            out[spec.name] = _linear_record(W0, W, st, stages)
            adapter.set_weight(block, spec, W.to(W0.dtype))
    return out


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
    return num / den if compare and den > 0 else None


def _free(block) -> None:
    del block
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
