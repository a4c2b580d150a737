"""Distillation losses: pure tensor functions (no modules, no ranks).

Notation: student logits `z_s`, teacher logits `z_t` of shape `[B, L, V]`, temperature `T`, next-token targets
`y = ids[:, 1:]`, and a boolean `valid [B, L-1]` marking the positions `p` whose prediction of token `p+1` counts.
Only positions `0 .. L-2` are used (the last position has no target), for the KD term as well as the LM term, so
both terms average over the same tokens.

    p_t = softmax(z_t / T),  log p_s = log_softmax(z_s / T)
    KD  = T² · mean_{valid p} Σ_v p_t(v) · (log p_t(v) − log p_s(v))          (forward KL, teacher || student)
    LM  = mean_{valid p} −log softmax(z_s)[y_p]                              (cross entropy at T = 1)
    loss = (1 − w) · KD + w · LM,   w = lm_loss_weight

The `T²` factor (Hinton et al., 2015) keeps the gradient scale of the KD term independent of `T`.
Worked example: V = 2, one position, z_t = [0, 0], z_s = [ln 3, 0], T = 1: p_t = [½, ½], p_s = [¾, ¼],
KD = ½·ln(½/¾) + ½·ln(½/¼) = ½·ln(4/3) ≈ 0.1438.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def _positions(logits: Tensor) -> Tensor:
    """`[B, L, V]` -> the `[B, L-1, V]` positions that have a next token, in float32 (half logits lose the KL)."""
    return logits[:, :-1].float()


def _masked_mean(per_token: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return per_token.mean()
    w = valid.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, valid: Tensor | None = None
) -> Tensor:
    """`T² · mean_valid KL(softmax(z_t/T) || softmax(z_s/T))` over positions `0 .. L-2` (module docstring).

    `student_logits`, `teacher_logits`: `[B, L, V]` (the teacher's are not differentiated); `valid`: `[B, L-1]`
    bool or None (all positions)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ (same vocabulary and tokens are needed)"
        )
    T = float(temperature)
    log_ps = F.log_softmax(_positions(student_logits) / T, dim=-1)
    log_pt = F.log_softmax(_positions(teacher_logits).detach() / T, dim=-1)
    per_token = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return T * T * _masked_mean(per_token, valid)


def lm_loss(student_logits: Tensor, ids: Tensor, valid: Tensor | None = None) -> Tensor:
    """Next-token cross entropy `mean_valid −log softmax(z_s[:, p])[ids[:, p+1]]`; `valid`: `[B, L-1]` or None."""
    logits = _positions(student_logits)
    per_token = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)
    return _masked_mean(per_token, valid)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    ids: Tensor,
    *,
    temperature: float = 1.0,
    lm_loss_weight: float = 0.0,
    valid: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """`(1 − w)·KD + w·LM` and its parts `{"kd": ..., "lm": ...}` as floats (LM is computed only when w > 0)."""
    kd = kd_loss(student_logits, teacher_logits, temperature, valid)
    parts = {"kd": float(kd.detach())}
    if lm_loss_weight <= 0:
        return kd, parts
    lm = lm_loss(student_logits, ids, valid)
    parts["lm"] = float(lm.detach())
    return (1.0 - lm_loss_weight) * kd + lm_loss_weight * lm, parts
