"""Sparsity masks of a ZeRO-3 partitioned student: zeros from unstructured stages stay exactly zero.

At load, every parameter is gathered once; a tensor whose exact-zero fraction is at least `threshold` gets a mask
`M = (W != 0)`. Each rank keeps the slice of `M` that matches its ZeRO-3 partition (`param.ds_tensor`, the flat
elements `[r·P, (r+1)·P)` with `P = ds_tensor.ds_numel`, padded past the end) and, for persistent parameters (small
tensors DeepSpeed keeps gathered on every rank, `param.ds_persist`), the full mask.

After each optimizer step, `apply` sets `W ← W ⊙ M` in every copy the optimizer or the forward reads: the fp32
master partition (`deepspeed.utils.safe_get/set_local_fp32_param`), the rank's partition `ds_tensor`, and the
gathered `param.data` of a persistent parameter. Adam's moments are not masked: the masked weights are reset to
zero after every step, which is what keeps them zero, whatever the optimizer did to them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass
class ParamMask:
    """The mask of one parameter: `local` over this rank's partition, `full` (shape of the parameter) when the
    parameter is persistent; `zeros` and `numel` count the whole tensor."""

    name: str
    param: nn.Parameter
    local: Tensor
    full: Tensor | None
    zeros: int
    numel: int


def partition_slice(full_mask: Tensor, partition_numel: int, rank: int) -> Tensor:
    """Rank `rank`'s slice `flat[rank·P : (rank+1)·P]` of a flattened mask, padded with True to `P` elements."""
    flat = full_mask.reshape(-1)
    start = rank * partition_numel
    out = torch.ones(partition_numel, dtype=torch.bool, device=flat.device)
    n = max(0, min(partition_numel, flat.numel() - start))
    if n:
        out[:n] = flat[start : start + n]
    return out


def record_masks(module: nn.Module, threshold: float) -> dict[str, ParamMask]:
    """Masks of every parameter of the (ZeRO-3 partitioned) `module` with `zeros / numel >= threshold`.

    Collective: every rank must call it (each parameter is gathered once). `threshold > 1` records none."""
    import deepspeed
    import torch.distributed as dist

    masks: dict[str, ParamMask] = {}
    if threshold > 1:
        return masks
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            full = p.data != 0
        zeros = int(full.numel() - full.sum())
        if zeros == 0 or zeros < threshold * full.numel():
            continue
        rank = dist.get_rank(group=getattr(p, "ds_process_group", None))
        local = partition_slice(full, int(p.ds_tensor.ds_numel), rank).to(p.ds_tensor.device)
        keep_full = full.to(p.ds_tensor.device) if getattr(p, "ds_persist", False) else None
        masks[name] = ParamMask(name, p, local, keep_full, zeros, full.numel())
    log.info(
        "sparsity masks: %d tensor(s) with >= %.0f%% exact zeros (%d zeros in all)",
        len(masks),
        100 * threshold,
        sum(m.zeros for m in masks.values()),
    )
    return masks


@torch.no_grad()
def apply_masks(masks: dict[str, ParamMask]) -> None:
    """`W ← W ⊙ M` in the fp32 master partition, the rank's partition and, when gathered, the full parameter."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    for m in masks.values():
        p = m.param
        if p.requires_grad:
            master = safe_get_local_fp32_param(p)
            safe_set_local_fp32_param(p, master.masked_fill(~m.local.to(master.device), 0))
        p.ds_tensor.data.masked_fill_(~m.local, 0)
        if p.ds_status == ZeroParamStatus.AVAILABLE and p.data.numel() == m.numel:
            if m.full is None:
                raise RuntimeError(
                    f"sparsity mask of {m.name}: the parameter is gathered after the optimizer step "
                    "but is not persistent; its full mask was not kept"
                )
            p.data.masked_fill_(~m.full, 0)
