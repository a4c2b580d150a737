"""Perplexity and size of a checkpoint on a text (non-overlapping windows, BOS first)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def eval_windows(tokenizer, text: str, windows: int, seq_len: int) -> torch.Tensor:
    """[windows, seq_len] ids: each window is BOS followed by the next seq_len-1 tokens of the text
    (non-overlapping). Fewer windows if the text is short (at least one is required)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    bos = tokenizer.bos_token_id
    body = seq_len - 1 if bos is not None else seq_len
    n = min(windows, ids.numel() // body)
    if n < 1:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    rows = ids[: n * body].view(n, body)
    if bos is not None:
        rows = torch.cat([torch.full((n, 1), bos, dtype=rows.dtype), rows], dim=1)
    return rows


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean token NLL) over all predicted positions of all windows."""
    nll, count = 0.0, 0
    for s in range(0, ids.shape[0], batch_size):
        batch = ids[s : s + batch_size].to(model.device)
        logits = model(batch).logits.float()
        lp = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(lp)
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def load_model(path: str | Path, dtype=torch.float32):
    """Stock transformers load; blockprune outputs with non-uniform widths load through engine.load_pruned."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def model_sizes(model) -> dict:
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"params": params, "nonzero": nonzero, "sparsity": 1 - nonzero / params, "model_mb": nbytes / 2**20}


def evaluate_one(path: str | Path, text: str, windows: int = 16, seq_len: int = 512) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    ids = eval_windows(tok, text, windows, seq_len)
    model = load_model(path)
    t0 = time.perf_counter()
    ppl = perplexity(model, ids)
    res = {"model": str(path), "ppl": ppl, "windows": ids.shape[0], "seq_len": ids.shape[1],
           "eval_s": round(time.perf_counter() - t0, 2), **model_sizes(model)}
    del model
    return res


def evaluate(path: str | Path, data: str | Path, windows: int = 16, seq_len: int = 512,
             compare: str | Path | None = None) -> dict:
    text = Path(data).read_text(encoding="utf-8", errors="replace")
    res = evaluate_one(path, text, windows, seq_len)
    if compare:
        res["compare"] = evaluate_one(compare, text, windows, seq_len)
    return res


def format_eval(res: dict) -> str:
    rows = [res] + ([res["compare"]] if "compare" in res else [])
    lines = [f"{'model':<50} {'ppl':>9} {'params':>12} {'nonzero':>12} {'sparsity':>9} {'MB':>8}"]
    for r in rows:
        lines.append(f"{str(r['model'])[-50:]:<50} {r['ppl']:>9.3f} {r['params']:>12,} {r['nonzero']:>12,} "
                     f"{r['sparsity']:>9.4f} {r['model_mb']:>8.1f}")
    return "\n".join(lines)
