"""`blockprune eval`: perplexity of a checkpoint on a text, prefill and decode speed, sizes and memory.

Perplexity. The text is tokenized once (no special tokens) and cut into non-overlapping windows of `seq_len`
tokens, each BOS followed by the next seq_len-1 text tokens (no BOS when the tokenizer has none):

    ppl = exp( Σ_windows Σ_{t≥1} −log p(x_t | x_<t) / Σ_windows (seq_len − 1) )

Speed, under `torch.inference_mode()`, timed with `time.perf_counter` (device synchronised), a warm-up run excluded,
the median of `repeats` runs, on a [batch, prompt_len] prompt cut from the same text (BOS first):
- prefill: one forward of the prompt that fills the KV cache (last-position logits only);
  `prefill_ms`, `prefill_tokens_per_s = batch·prompt_len / prefill time`.
- decode: greedy `generate` with KV cache for exactly `new_tokens` tokens (min_new_tokens = max_new_tokens); a
  logits processor stamps the clock after each step's forward, so the decode time is the time from the first to
  the last new token, new_tokens−1 steps: `decode_ms_per_token` (one step, all rows) and
  `decode_tokens_per_s = batch·(new_tokens−1) / decode time`; `generate_ms` is the whole call.

Memory: `model_mb` = bytes of the parameters; `peak_rss_mb` = the process's peak resident set while the model was
loaded and measured (the kernel's counter is reset before each model on Linux, so `--compare` gives one per model);
`device_peak_mb` on CUDA.
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine import memory
from engine.calibration import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedConfig:
    """Shape of the speed measurement: `batch` prompts of `prompt_len` tokens, `new_tokens` greedy tokens each;
    `warmup` untimed runs, then the median of `repeats` timed runs."""

    batch: int = 1
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1

    def validate(self) -> None:
        if self.batch < 1 or self.prompt_len < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"speed settings must be positive (batch, prompt_len, repeats; warmup >= 0): {self}")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2 to time decode steps, got {self.new_tokens}")


DEFAULT_SPEED = SpeedConfig()


# ------------------------------------------------------------------------------------------------------ tokens


def text_ids(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids of `text`, no special tokens added."""
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]


def _rows(ids: torch.Tensor, n: int, length: int, bos: int | None) -> torch.Tensor:
    """[n, length]: consecutive chunks of `ids`, each after a BOS when `bos` is not None."""
    body = length - 1 if bos is not None else length
    rows = ids[: n * body].reshape(n, body)
    if bos is not None:
        rows = torch.cat([torch.full((n, 1), bos, dtype=rows.dtype), rows], dim=1)
    return rows


def windows_from_ids(
    ids: torch.Tensor, bos: int | None, windows: int, seq_len: int, source: str = "text"
) -> torch.Tensor:
    """[n, seq_len] non-overlapping windows (BOS + seq_len-1 tokens), n = min(windows, what the text holds)."""
    if seq_len < 2 or windows < 1:
        raise ValueError(f"need seq_len >= 2 and windows >= 1, got seq_len={seq_len}, windows={windows}")
    body = seq_len - 1 if bos is not None else seq_len
    n = min(windows, ids.numel() // body)
    if n < 1:
        raise ValueError(
            f"{source}: {ids.numel()} tokens, fewer than one evaluation window of {seq_len} "
            f"({body} text tokens); use a longer text or a smaller --seq-len"
        )
    if n < windows:
        log.warning("%s holds only %d of the %d requested windows of %d tokens", source, n, windows, seq_len)
    return _rows(ids, n, seq_len, bos)


def eval_windows(tokenizer, text: str, windows: int, seq_len: int, source: str = "text") -> torch.Tensor:
    """[windows, seq_len] ids: each window is BOS followed by the next seq_len-1 tokens of the text
    (non-overlapping). Fewer windows if the text is short (at least one is required)."""
    return windows_from_ids(text_ids(tokenizer, text), tokenizer.bos_token_id, windows, seq_len, source)


def prompt_ids(ids: torch.Tensor, bos: int | None, batch: int, prompt_len: int) -> torch.Tensor:
    """[batch, prompt_len] prompts for the speed runs: consecutive chunks of the text (BOS first), the text
    repeated as often as needed."""
    body = prompt_len - 1 if bos is not None else prompt_len
    need = batch * body
    if ids.numel() == 0:
        raise ValueError("the text has no tokens to build a prompt from")
    reps = -(-need // ids.numel())
    return _rows(ids.repeat(reps), batch, prompt_len, bos)


# -------------------------------------------------------------------------------------------------- perplexity


def perplexity(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean token NLL) over all predicted positions (1..L-1) of all windows `ids` [n, L]."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, ids.shape[0], batch_size):
            batch = ids[s : s + batch_size].to(model.device)
            logits = model(batch, use_cache=False).logits.float()
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
            )
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


# ------------------------------------------------------------------------------------------------------ speed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """A logits processor that records `perf_counter` once per generated token (after that step's forward)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def time_prefill(model, ids: torch.Tensor) -> float:
    """Seconds for one forward of `ids` [batch, L] that fills a KV cache (last-position logits only)."""
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        _sync(ids.device)
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, use_cache=True, **extra)
        _sync(ids.device)
        return time.perf_counter() - t0


def time_decode(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(seconds per decode step, seconds of the whole call) of greedy `generate` with KV cache producing exactly
    `new_tokens` tokens per row; a step is the time between consecutive new tokens (new_tokens-1 of them)."""
    from transformers import GenerationConfig, LogitsProcessorList

    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    cfg = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    clock = _StepClock(ids.device)
    with torch.inference_mode():
        _sync(ids.device)
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=cfg,
            logits_processor=LogitsProcessorList([clock]),
        )
        _sync(ids.device)
        total = time.perf_counter() - t0
    made = out.shape[1] - ids.shape[1]
    if made != new_tokens or len(clock.stamps) != new_tokens:
        raise RuntimeError(f"generate made {made} tokens ({len(clock.stamps)} steps), expected {new_tokens}")
    return (clock.stamps[-1] - clock.stamps[0]) / (new_tokens - 1), total


def _timed_runs(fn, warmup: int, repeats: int) -> list:
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repeats)]


def measure_speed(model, prompt: torch.Tensor, speed: SpeedConfig) -> dict:
    """Prefill and decode speed of `model` on `prompt` [batch, prompt_len] (see the module docstring)."""
    speed.validate()
    prompt = prompt.to(model.device)
    batch, length = prompt.shape
    prefill = statistics.median(_timed_runs(lambda: time_prefill(model, prompt), speed.warmup, speed.repeats))
    runs = _timed_runs(lambda: time_decode(model, prompt, speed.new_tokens), speed.warmup, speed.repeats)
    step = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    return {
        **asdict(speed),
        "prefill_ms": prefill * 1e3,
        "prefill_tokens_per_s": batch * length / prefill,
        "decode_ms_per_token": step * 1e3,
        "decode_tokens_per_s": batch / step,
        "generate_ms": total * 1e3,
    }


# ------------------------------------------------------------------------------------------- model and sizes


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_checkpoint(path: str | Path) -> Path:
    """`path` as a Path; FileNotFoundError unless it is a directory holding config.json."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    return path


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """The model of checkpoint `path`, in eval mode on `device`.

    Stock checkpoints (every blockprune output of uniform width) load with `AutoModelForCausalLM`; non-uniform
    blockprune outputs (per-layer widths, removed sublayers, per-layer expert counts; DESIGN.md §6) with
    `engine.load_pruned`, which uses this package's copy of the checkpoint's model class (no remote code)."""
    from engine.loader import load_pruned

    path = check_checkpoint(path)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r} (e.g. float32, bfloat16, float16)")
        dtype = getattr(torch, dtype)
    model = load_pruned(str(path), dtype=dtype)
    return model.to(resolve_device(device)).eval()


def model_sizes(model) -> dict:
    """Parameter count, nonzero parameters, sparsity = 1 - nonzero/params, and `model_mb` = parameter bytes / 2^20
    (tied tensors counted once)."""
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"params": params, "nonzero": nonzero, "sparsity": 1 - nonzero / params, "model_mb": nbytes / 2**20}


# --------------------------------------------------------------------------------------------------- evaluate


def evaluate_one(
    path: str | Path,
    text: str,
    windows: int = 16,
    seq_len: int = 512,
    *,
    speed: SpeedConfig | None = DEFAULT_SPEED,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str = torch.float32,
    source: str = "text",
    batch_size: int = 4,
) -> dict:
    """Evaluate one checkpoint on `text`: perplexity, sizes, memory and (unless `speed` is None) speed.
    Returns a JSON-serialisable dict (fields in the module docstring)."""
    dev = resolve_device(device)
    tok = load_tokenizer(check_checkpoint(path))
    ids = text_ids(tok, text)
    win = windows_from_ids(ids, tok.bos_token_id, windows, seq_len, source)
    memory.reset_peak_rss()
    memory.reset_device_peak(dev)
    model = load_model(path, dtype=dtype, device=dev)
    t0 = time.perf_counter()
    ppl = perplexity(model, win, batch_size=batch_size)
    res = {
        "model": str(path),
        "ppl": ppl,
        "windows": int(win.shape[0]),
        "seq_len": int(win.shape[1]),
        "tokens": int(win[:, 1:].numel()),
        "eval_s": round(time.perf_counter() - t0, 3),
        "device": str(dev),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **model_sizes(model),
    }
    if speed is not None:
        res.update(measure_speed(model, prompt_ids(ids, tok.bos_token_id, speed.batch, speed.prompt_len), speed))
    res["peak_rss_mb"] = round(memory.peak_rss_mb(), 1)
    res["device_peak_mb"] = memory.device_peak_mb(dev)
    log.info("%s: ppl %.4f on %d x %d tokens", path, ppl, res["windows"], res["seq_len"])
    del model
    gc.collect()
    return res


def evaluate(
    path: str | Path,
    data: str | Path,
    windows: int = 16,
    seq_len: int = 512,
    compare: str | Path | None = None,
    *,
    batch: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    speed: bool = True,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str = torch.float32,
) -> dict:
    """`blockprune eval`: `evaluate_one` of `path` on the text file `data`; with `compare`, the second
    checkpoint's result under the key "compare" (same windows and prompts)."""
    for p in (path, compare) if compare else (path,):
        check_checkpoint(p)
    data = Path(data)
    if not data.is_file():
        raise FileNotFoundError(f"{data}: evaluation text not found")
    text = data.read_text(encoding="utf-8", errors="replace")
    cfg = SpeedConfig(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats) if speed else None
    if cfg is not None:
        cfg.validate()
    kw = {"speed": cfg, "device": device, "dtype": dtype, "source": str(data)}
    res = evaluate_one(path, text, windows, seq_len, **kw)
    if compare:
        res["compare"] = evaluate_one(compare, text, windows, seq_len, **kw)
    return res


# ----------------------------------------------------------------------------------------------------- format

_COLUMNS = [  # (header, key, format)
    ("ppl", "ppl", "{:.3f}"),
    ("params", "params", "{:,}"),
    ("nonzero", "nonzero", "{:,}"),
    ("sparsity", "sparsity", "{:.4f}"),
    ("MB", "model_mb", "{:.1f}"),
    ("prefill tok/s", "prefill_tokens_per_s", "{:.1f}"),
    ("prefill ms", "prefill_ms", "{:.2f}"),
    ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
    ("ms/token", "decode_ms_per_token", "{:.2f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
]


def _short(path: str | Path, keep: int = 40) -> str:
    s = str(path)
    return s if len(s) <= keep else "..." + s[-(keep - 3) :]


def format_eval(res: dict) -> str:
    """A text table: one row per model (the compared one second), then the ratio first / second when comparing
    (sparsity excepted), and a line stating the windows and the speed shape. Columns absent from a result (e.g.
    speed when it was not measured) are left out."""
    rows = [res] + ([res["compare"]] if "compare" in res else [])
    cols = [c for c in _COLUMNS if all(r.get(c[1]) is not None for r in rows)]
    names = [_short(r["model"]) for r in rows]
    width = max(12, *(len(n) for n in names))
    cells = [[n] + [fmt.format(r[key]) for _, key, fmt in cols] for n, r in zip(names, rows)]
    if len(rows) == 2:
        cells.append(
            ["ratio"]
            + [f"{rows[0][k] / rows[1][k]:.3f}" if rows[1][k] and k != "sparsity" else "-" for _, k, _ in cols]
        )
    heads = ["model"] + [h for h, _, _ in cols]
    sizes = [width] + [max(len(h), *(len(c[i + 1]) for c in cells)) for i, (h, _, _) in enumerate(cols)]
    lines = ["  ".join(h.ljust(s) if i == 0 else h.rjust(s) for i, (h, s) in enumerate(zip(heads, sizes)))]
    lines += [
        "  ".join(c.ljust(s) if i == 0 else c.rjust(s) for i, (c, s) in enumerate(zip(row, sizes))) for row in cells
    ]
    lines.append(
        f"perplexity over {res['windows']} x {res['seq_len']} tokens (BOS first)"
        + (
            f"; speed at batch {res['batch']}, prompt {res['prompt_len']}, {res['new_tokens']} new tokens, "
            f"median of {res['repeats']} on {res['device']}"
            if "batch" in res
            else ""
        )
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- lm-eval hand-off


class LmEvalMissing(ValueError):
    """lm-evaluation-harness is not installed. A ValueError so that the CLI reports it in one line."""


def _yaml_ignoring_tags(text: str):
    """A task YAML as data; lm-eval's own tags (`!function utils.process_docs`) become None."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return yaml.load(text, Loader=Loader)


def lm_eval_task_files(tasks: str | Path) -> tuple[list[Path], list[str]]:
    """The YAML files of `tasks` (one file, or every *.yaml / *.yml under a directory) and the task (or group)
    names they define, in order: a file's `task:` when it is a string, else its `group:`."""
    root = Path(tasks)
    if not root.exists():
        raise FileNotFoundError(f"{root}: lm-eval task file or directory not found")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml"))
    names = []
    for f in files:
        doc = _yaml_ignoring_tags(f.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError(f"{f}: not an lm-eval task file (a YAML mapping with `task:`)")
        name = doc.get("task") if isinstance(doc.get("task"), str) else doc.get("group")
        if isinstance(name, str) and name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"{root}: no lm-eval task (a YAML file with `task: NAME`) found")
    return files, names


def lm_eval_tasks(
    path: str | Path,
    tasks: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str = torch.float32,
    batch_size: int = 4,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
) -> dict:
    """`blockprune eval MODEL --tasks FILE_OR_DIR`: run local lm-evaluation-harness tasks on checkpoint `path`
    through lm-eval's Python API (`simple_evaluate`).

    The checkpoint is loaded by `load_model` (stock outputs with transformers; non-uniform outputs with this
    package's copy of their model class, so no `trust_remote_code`) and handed to lm-eval's `HFLM` as a model
    object with its tokenizer. Only the task files under `tasks` are indexed (`TaskManager(include_path=...,
    include_defaults=False)`: lm-eval's ~15k built-in tasks take ~20 s to index; run `lm_eval` itself for them).
    Datasets are whatever the YAML says (`dataset_path: json` + `data_files` for local JSONL; nothing is
    downloaded offline). Returns {"model", "tasks", "results": lm-eval's per-task metrics, "n_samples",
    "eval_s", "lm_eval_version"}.
    """
    check_checkpoint(path)
    files, names = lm_eval_task_files(tasks)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LmEvalMissing(
            f"--tasks needs lm-evaluation-harness, which is not installed ({e}): pip install 'blockprune[eval]'"
        ) from e
    dev = resolve_device(device)
    model = load_model(path, dtype=dtype, device=dev)
    tok = load_tokenizer(path)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(dev))
    manager = TaskManager(include_path=sorted({str(f.parent) for f in files}), include_defaults=False)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        bootstrap_iters=0,
        log_samples=False,
    )
    return {
        "model": str(path),
        "tasks": names,
        "results": out["results"],
        "n_samples": {k: v.get("effective", v.get("original")) for k, v in out.get("n-samples", {}).items()},
        "eval_s": round(time.perf_counter() - t0, 3),
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
    }


def format_lm_eval(res: dict) -> str:
    """One line per task and metric: `task  metric  value`; stderr columns and aliases left out."""
    lines = [f"lm-eval {res['lm_eval_version']} on {_short(res['model'], 60)} ({res['eval_s']:.1f} s)"]
    for task, metrics in res["results"].items():
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len") or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            lines.append(f"  {task:<24} {key.removesuffix(',none'):<20} {value:.4f}")
    return "\n".join(lines)
