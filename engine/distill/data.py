"""Training data of a distillation run: token windows, the batch schedule, and self-data generation.

Windows. The data source is read exactly as calibration data (`engine.calibration`: text file, directory of .txt,
JSONL, datasets directory; same tokenization, EOS between documents, BOS first): `n = min(samples, len(s) // w)`
disjoint windows of `seq_len` tokens (`w = seq_len − 1` with BOS) drawn with the calibration sampling rule. When the
text holds fewer windows than asked, the run cycles over the ones it has (one epoch = `n` windows), with a warning.

Schedule. Step `s` uses the global sequence positions `k = s·B .. s·B + B − 1` (`B = batch_size`); position `k`
is window `perm_e[k mod n]` of epoch `e = k // n`, `perm_e = randperm(n, seed + e)`. Rank `r` of `W` takes the
positions `r·B/W .. (r+1)·B/W − 1` of the step and splits them into micro-batches.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine import calibration as cal
from engine.calibration import CalibrationConfig, CalibrationError

log = logging.getLogger(__name__)


def training_windows(
    data: str, seq_len: int, samples: int, seed: int, tokenizer: Any, text_field: str = "text"
) -> Tensor:
    """Up to `samples` disjoint windows `[n, seq_len]` int64 from `data` (module docstring); CalibrationError when
    the source holds not even one window."""
    cfg = CalibrationConfig(data=str(data), samples=samples, seq_len=seq_len, seed=seed, text_field=text_field)
    bos = cal._bos_id(cfg, tokenizer)
    window = seq_len - (bos is not None)
    _, docs = cal._open_source(Path(cfg.data).expanduser(), cfg, tokenizer)
    stream = cal._tokenize(docs, tokenizer, cal.STREAM_FACTOR * samples * window + window)
    n = min(samples, stream.numel() // window)
    if n < 1:
        raise CalibrationError(f"{data}: {stream.numel()} tokens found, one window of {window} tokens needed")
    if n < samples:
        log.warning(
            "distill data: %s holds %d windows of %d tokens, %d asked; the run cycles over them",
            data,
            n,
            seq_len,
            samples,
        )
    ids = cal._sample_windows(stream, n, window, seed)
    if bos is not None:
        ids = torch.cat([torch.full((n, 1), bos, dtype=torch.int64), ids], dim=1)
    log.info("distill data: %d windows of %d tokens from %s", n, seq_len, data)
    return ids


def step_indices(n_windows: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Window indices `[batch_size]` of global step `step` (the schedule of the module docstring)."""
    k = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = (k // n_windows).tolist()
    perms = {e: torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed + e)) for e in set(epochs)}
    return torch.stack([perms[e][int(i)] for e, i in zip(epochs, k % n_windows)])


def rank_micro_batches(indices: Tensor, rank: int, world: int, micro: int) -> list[Tensor]:
    """This rank's share of a step's indices, split into micro-batches of `micro`."""
    per_rank = indices.numel() // world
    mine = indices[rank * per_rank : (rank + 1) * per_rank]
    return list(mine.split(micro))


@torch.no_grad()
def self_data_batch(
    teacher: torch.nn.Module, windows: Tensor, prompt_len: int, temperature: float, eos_id: int | None, synced: bool
) -> tuple[Tensor, Tensor]:
    """Self-data: the teacher continues the first `prompt_len` tokens of each window up to the window's length.

    Returns `(ids [b, L], valid [b, L-1])`: the prompt followed by the teacher's response, padded with EOS after
    the response ends; `valid[:, p]` is True where token `p+1` belongs to the response (the loss is on the
    response only, the EOS that ends it included). Greedy decoding when `temperature == 0`, else sampling."""
    b, L = windows.shape
    prompts = windows[:, :prompt_len]
    pad = eos_id if eos_id is not None else 0
    kwargs: dict[str, Any] = {"do_sample": temperature > 0, "top_k": None, "top_p": None}
    if temperature > 0:
        kwargs["temperature"] = temperature
    out = teacher.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=L - prompt_len,
        min_new_tokens=0,
        pad_token_id=pad,
        eos_token_id=eos_id,
        synced_gpus=synced,
        use_cache=True,
        **kwargs,
    )
    ids = torch.full((b, L), pad, dtype=windows.dtype, device=windows.device)
    ids[:, : out.shape[1]] = out[:, :L]
    valid = torch.zeros(b, L - 1, dtype=torch.bool, device=windows.device)
    for i in range(b):
        resp = out[i, prompt_len:L]
        end = resp.numel()
        if eos_id is not None and (resp == eos_id).any():
            end = int((resp == eos_id).nonzero()[0]) + 1  # keep the EOS that ends the response
        valid[i, prompt_len - 1 : prompt_len - 1 + end] = True
    return ids, valid
