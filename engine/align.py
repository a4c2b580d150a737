"""Channel alignment of structured outputs: which multiple kept MLP / expert channel counts are rounded to.

GPU GEMM kernels (cuBLAS, CUTLASS, Triton) tile the reduction and output dimensions in multiples of 16 to 128
elements; a width like 1297 leaves a ragged last tile that runs at the cost of a full one, or falls back to a slower
kernel. So by default (`align: auto`) kept channel counts are multiples of

    auto_align(n) = min(64, 2^⌊log2(max(⌊n / 16⌋, 1))⌋)          # n: the group's source channel count

64 for every real model (n ≥ 1024: 1536, 8192, 14336, ...; Qwen3-MoE experts (768): 32) and never coarser than about
1/16 of the width, so small layers (tiny test models: n = 96 -> 4) can still land near their target. KV groups are
always whole heads (their own alignment); routed experts' widths are also multiples of 8 (`EXPERT_ALIGN`: torch's
grouped matmul over the fused expert tensors needs 16-byte strides). An integer `align` is used as given
(`align: 1`: exact widths, the old behaviour).

The price is rounding: per layer, each channel kind keeps up to ``align/2`` channels more or fewer than its exact
share (uniform allocation: the total lands off target by that much; a global budget moves the difference to the
other layers). `engine.planning.alignment_note` says what it comes to for a recipe (`blockprune plan`).
"""

from __future__ import annotations

import math
from typing import Any

AUTO = "auto"
AUTO_MAX = 64  # the largest automatic alignment: a multiple of every GEMM tile width up to 64
AUTO_SCALE = 16  # automatic alignment is at most 1/AUTO_SCALE of the width (power of two below it)
EXPERT_ALIGN = 8  # fused experts: torch's grouped matmul needs 16-byte strides (also engine.units.EXPERT_ALIGN)


def auto_align(n: int) -> int:
    """The automatic channel alignment of a group of `n` channels (module docstring): a power of two, at most 64 and
    at most ``n / 16`` (at least 1). ``auto_align(1536) == 64``, ``auto_align(96) == 4``, ``auto_align(10) == 1``."""
    step = max(int(n) // AUTO_SCALE, 1)
    return min(AUTO_MAX, 1 << (step.bit_length() - 1))


def resolve_align(align: int | str, n: int, kind: str = "channel") -> int:
    """The multiple kept counts of a unit kind with `n` units per group are rounded to: KV groups 1 (whole heads),
    channels `align` (or `auto_align(n)` for "auto"), routed experts' channels lcm(that, 8)."""
    if kind == "kv_group":
        return 1
    a = auto_align(n) if align == AUTO else int(align)
    return math.lcm(a, EXPERT_ALIGN) if kind == "expert_channel" else a


def check_align(value: Any, where: str) -> int | str:
    """`value` as a recipe's `align`: "auto" or an integer >= 1 (also "64" as YAML or a CLI override gives it).
    ValueError naming `where` otherwise."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, bool):
        raise ValueError(f"{where} = {value!r}: expected 'auto' or an integer >= 1")
    try:
        a = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f"{where} = {value!r}: expected 'auto' or an integer >= 1") from None
    if a < 1:
        raise ValueError(f"{where} = {a}: must be >= 1 (or 'auto')")
    return a


def round_up(n: int, align: int) -> int:
    """The smallest multiple of `align` that is >= `n`."""
    return -(-int(n) // align) * align
