"""The scoring pass of a global allocation: per-layer energies from one dense sweep over the blocks.

Like the depth scoring pass (`engine.pipeline._depth_scoring_pass`): embeddings, then every block in turn, one in
memory, its dense outputs fed forward through the activation cache; nothing is solved or written. Per block, one
dense forward with input hooks gathers the statistics the pruning pass would (column norms; for structured stages
also the Gram of each consumer input: o_proj, down_proj, each expert's down_proj), then, without re-reading
anything, it records (`docs/allocation.md` has the formulas):

- `influence`: block influence ``BI = 1 − mean_t cos(x_t, y_t)`` (ShortGPT);
- `outlier_ratio`: OWL's ``D = #{S_ij > M · mean S} / #S`` over the Wanda scores ``|W_ij|·‖X_j‖`` of the layer's
  prunable linears;
- `score_stats`: per unit kind (structured: KV groups, channels; unstructured: each linear's role, experts pooled)
  the count, sum and sum of squares of the stage's unit scores, for the "mean standardised unit score" energy;
- structured only, `head_error[r]` / `channel_error[f]`: the relative block output error when only ``r`` KV groups
  (``r = 0 .. n_kv − 1``) / only a fraction ``f`` (of `CHANNEL_GRID`) of every channel group are removed in score
  order with no reconstruction. Heads: one masked forward per ``r`` (a KV group's output also feeds the MLP, so the
  attention output's own error would understate it: in SmolLM2's first block by 10x). Channels: no forward, the
  exact ``Σ_t ‖W_{:,R} x_{t,R}‖² = tr(W_R H_RR W_Rᵀ)`` of the down_proj input Gram (removing MLP channels changes
  the block output by exactly that; for routed experts the Gram of the routed tokens, routing weights ignored);
- `errors[S]`, for each global target ``S`` of the grid: the relative block output error
  ``Σ_t ‖y'_t − y_t‖² / Σ_t ‖y_t‖²`` when this block alone is pruned at ``S`` (its dense input, the stage's score,
  no reconstruction: removed units' consumer columns, or the masked weights, set to zero; structured: KV groups
  and channels divided by the run's `split`, with this layer's curves), one masked forward each; also
  `errors_token[S]` = ``mean_t ‖y'_t − y_t‖² / ‖y_t‖²`` from the same forwards (recorded, not used by default: the
  pooled ratio is dominated by tokens with massive activations, e.g. SmolLM2-135M's BOS token from block 11 on, yet
  it gave better allocations than the per-token one; docs/allocation.md has the measurements).

Results are cached in ``<output>/blockprune_scores.json`` under a key hashing the input checkpoint's fingerprint,
the calibration token ids, the compute dtype, the world size and the scoring settings (not the target, the rule or
the temperature), so a resumed, re-targeted or re-tempered run reuses them.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from engine.arch import ArchAdapter, LinearSpec
from engine.config import name_selected
from solvers.allocation import interpolate_log, standardize_energy
from solvers.group_prune import groups_contiguous
from solvers.masks import magnitude_prune, wanda_prune, wanda_scores
from solvers.scores import block_influence, group_scores
from solvers.stats import InputStats, accumulate, col_norm_sq, init_stats

log = logging.getLogger(__name__)

SCORES_FILE = "blockprune_scores.json"
SCORES_FORMAT = "blockprune-scores"
FORMAT_VERSION = 3  # 3: `errors` pooled over tokens, `errors_token` per token (2 used per-token `errors`)
ERROR_GRID: tuple[float, ...] = (0.1, 0.3, 0.5)  # global targets at which block errors are measured (plus the run's)
CHANNEL_GRID: tuple[float, ...] = tuple(k / 32 for k in range(33))  # channel fractions of `channel_error`
ERROR_FLOOR = 1e-12  # errors below this count as this (log of zero)
_EXPERT_INDEX = re.compile(r"experts\.\d+\.")

# (layer, budget in parameters, layer scores so far) -> units removed per group of each kind
PlanFn = Callable[[int, float, dict], dict[str, int]]


@dataclass(frozen=True)
class ScoringSettings:
    """What the scores depend on besides the model and the calibration (part of the cache key, except `grid`).

    kind: "structured" | "unstructured". score: the order of units / the mask of weights (structured: the stage's
    score; unstructured: "magnitude", or "wanda" for wanda and sparsegpt stages). units / align / percdamp: the
    structured stage's; split: how its layers divide a budget between KV groups and channels (block errors are
    measured with it). targets / ignore: the unstructured stage's selection. owl_m: OWL's threshold M.
    grid: global targets at which block errors are measured (empty: none). skip: layers a depth stage removes.
    """

    kind: str
    score: str
    units: tuple[str, ...] = ()
    align: int = 1
    split: str = "proportional"
    percdamp: float = 0.01
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    owl_m: float = 5.0
    grid: tuple[float, ...] = ()
    skip: tuple[int, ...] = field(default_factory=tuple)

    def identity(self) -> dict:
        d = asdict(self)
        d.pop("grid")
        return d


# --------------------------------------------------------------------------------------------- cache file


def ids_digest(ids: Tensor) -> str:
    """sha256 (hex) of calibration token ids and their shape."""
    return hashlib.sha256(_ids_bytes(ids)).hexdigest()


def _ids_bytes(ids: Tensor) -> bytes:
    return ids.detach().to(torch.int64).cpu().contiguous().numpy().tobytes() + str(tuple(ids.shape)).encode()


def cache_key(
    fingerprint: str,
    ids: Tensor,
    dtype: torch.dtype,
    world_size: int,
    settings: ScoringSettings,
    rank_digests: list[str] | None = None,
) -> str:
    """sha256 (hex, 24 digits) of everything the scores depend on (see the module docstring). With several ranks
    pass every rank's `ids_digest` in rank order (each rank holds a slice of the calibration), so that all ranks
    compute the same key."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "version": FORMAT_VERSION,
                "model": fingerprint,
                "dtype": str(dtype),
                "world_size": world_size,
                "settings": settings.identity(),
            },
            sort_keys=True,
        ).encode()
    )
    h.update(_ids_bytes(ids) if rank_digests is None else "|".join(rank_digests).encode())
    return h.hexdigest()[:24]


def read_scores(path: str | Path) -> dict[str, dict]:
    """The entries {key: entry} of a scores file; {} when absent or unreadable (logged: it is only a cache)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != SCORES_FORMAT or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a {SCORES_FORMAT} v{FORMAT_VERSION} file")
        return dict(data["entries"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("scores cache %s is unusable (%s); scoring again", path, e)
        return {}


def write_scores(path: str | Path, entries: dict[str, dict]) -> None:
    """Write the entries atomically (temporary name, fsync, rename)."""
    from sharding.writer import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": SCORES_FORMAT, "version": FORMAT_VERSION, "entries": entries}
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode())


def covers(entry: dict | None, target: float | None) -> bool:
    """Whether a cached entry answers a run: it exists and, when block errors are needed (`target` given), its
    grid holds `target` or brackets it (log-interpolated)."""
    if entry is None:
        return False
    if target is None:
        return True
    grid = sorted(float(g) for g in entry.get("grid", []))
    return bool(grid) and grid[0] <= target <= grid[-1]


# --------------------------------------------------------------------------------------------- energies


def error_at(layer: dict, target: float) -> float:
    """The layer's relative block output error at global target `target`: measured when `target` is in its grid, else
    log-interpolated between the two nearest grid targets."""
    grid = sorted((float(k), float(v)) for k, v in layer["errors"].items())
    if not grid:
        raise ValueError(f"layer {layer['layer']}: no block errors were measured (scores without a grid)")
    return interpolate_log([g for g, _ in grid], [v for _, v in grid], target, floor=ERROR_FLOOR)


def layer_energies(layers: list[dict], energy: str, target: float) -> Tensor:
    """Standardised per-layer energies ``E_l`` (float64, mean 0, std 1 unless constant). High = keep more.

    error: ``ln err_l(S)``; influence: ``ln BI_l``; score: the mean over the layer's units of their scores
    standardised per unit kind over all layers, ``Σ_k n_lk (m_lk − μ_k)/σ_k / Σ_k n_lk``.
    """
    if energy == "error":
        raw = [math.log(max(error_at(r, target), ERROR_FLOOR)) for r in layers]
    elif energy == "influence":
        raw = [math.log(max(float(r["influence"]), ERROR_FLOOR)) for r in layers]
    elif energy == "score":
        raw = _mean_standardised_scores(layers)
    else:
        raise ValueError(f"unknown energy {energy!r}")
    return standardize_energy(raw)


def _mean_standardised_scores(layers: list[dict]) -> list[float]:
    pooled: dict[str, list[float]] = {}
    for r in layers:
        for kind, (n, s, sq) in r["score_stats"].items():
            acc = pooled.setdefault(kind, [0.0, 0.0, 0.0])
            acc[0], acc[1], acc[2] = acc[0] + n, acc[1] + s, acc[2] + sq
    moments = {k: (s / n, math.sqrt(max(sq / n - (s / n) ** 2, 0.0))) for k, (n, s, sq) in pooled.items() if n > 0}
    out = []
    for r in layers:
        num = den = 0.0
        for kind, (n, s, _) in r["score_stats"].items():
            mu, sd = moments.get(kind, (0.0, 0.0))
            if n > 0 and sd > 0:
                num += n * ((s / n) - mu) / sd
                den += n
        out.append(num / den if den else 0.0)
    return out


# --------------------------------------------------------------------------------------------- the pass


@torch.no_grad()
def scoring_pass(
    reader,
    adapter: ArchAdapter,
    cache,
    rt,
    settings: ScoringSettings,
    params: dict[int, int],
    plan_fn: PlanFn | None = None,
) -> list[dict]:
    """Dense sweep over every block not in `settings.skip` (the cache holds the embedded calibration on entry);
    returns one record per visited layer (module docstring). `params[i]`: the layer's prunable parameters (the
    budget of a grid target ``S`` is ``S · params[i]``); `plan_fn` turns it into units (structured)."""
    out = []
    for i in range(adapter.num_layers):
        if i in settings.skip:
            continue
        disk = reader.read(reader.names_with_prefix(adapter.block_prefix(i)), device=rt.device)
        block = adapter.build_block(i, disk, device=rt.device, dtype=rt.dtype)
        del disk
        out.append(_score_block(i, block, adapter, cache, rt, settings, params.get(i, 0), plan_fn))
        log.info(
            "scored block %d: influence %.4g, outlier ratio %.4g, errors %s",
            i,
            out[-1]["influence"],
            out[-1]["outlier_ratio"],
            {k: f"{v:.3g}" for k, v in out[-1]["errors"].items()},
        )
        cache.swap()
        del block
        gc.collect()
    return out


def _score_block(
    i: int, block: nn.Module, adapter: ArchAdapter, cache, rt, settings: ScoringSettings, P: int, plan_fn: PlanFn | None
) -> dict:
    specs = _prunable(adapter, block, i, settings)
    grams = _consumer_inputs(adapter, block, i, settings) if settings.kind == "structured" else set()
    stats, sums = _dense_forward(adapter, block, specs, grams, cache, rt, settings.score == "fluctuation")
    norm = max(sums["norm"], 1e-30)
    tokens = max(sums["tokens"], 1)
    rec: dict[str, Any] = {
        "layer": i,
        "tokens": int(sums["tokens"]),
        "output_norm": sums["norm"] / tokens,
        "influence": sums["influence"] / tokens,
        "outlier_ratio": _outlier_ratio(adapter, block, specs, stats, settings.owl_m),
    }
    if settings.kind == "structured":
        orders, rec["score_stats"], curves = _structured_scores(adapter, block, i, stats, settings, norm)
        heads = next((o for o in orders if o.kind == "kv_group"), None)
        if heads is not None:  # measured: removing r groups, r = 0 .. n_kv − 1 (pooled, like channel_error)
            curves["head_error"] = [0.0] + [
                _masked_error(adapter, block, cache, rt, _unit_masks(adapter, block, i, [heads], {"kv_group": r}))[0]
                / norm
                for r in range(1, heads.order.numel())
            ]
        rec.update(curves)
        masks = lambda S: _unit_masks(adapter, block, i, orders, plan_fn(i, S * P, rec) if plan_fn else {})
    else:
        rec["score_stats"] = _weight_score_stats(adapter, block, specs, stats, settings.score)
        masks = lambda S: _weight_masks(adapter, block, specs, stats, settings.score, S)
    measured = {_grid_key(S): _masked_error(adapter, block, cache, rt, masks(S)) for S in settings.grid}
    rec["errors"] = {k: pooled / norm for k, (pooled, _) in measured.items()}
    rec["errors_token"] = {k: per_token / tokens for k, (_, per_token) in measured.items()}
    return rec


def _grid_key(S: float) -> str:
    return format(float(S), ".6g")


def _prunable(adapter: ArchAdapter, block: nn.Module, i: int, settings: ScoringSettings) -> list[LinearSpec]:
    specs = adapter.linears(block, i)
    if settings.kind == "structured":
        return specs
    return [s for s in specs if name_selected(s.name, list(settings.targets), list(settings.ignore))]


def _consumer_inputs(adapter: ArchAdapter, block: nn.Module, i: int, settings: ScoringSettings) -> set[str]:
    from engine.stages.structured import consumer_inputs

    return consumer_inputs(adapter, block, i, list(settings.units))


def _dense_forward(
    adapter: ArchAdapter, block: nn.Module, specs: list[LinearSpec], grams: set[str], cache, rt, moments: bool
) -> tuple[dict[str, InputStats], dict[str, float]]:
    """One forward over every micro-batch: input statistics (Grams for `grams`, column norms for the rest), the
    dense outputs into the cache, and the sums of block influence, output norm and tokens (over all ranks)."""
    widths = {s.input_id: s.d_in for s in specs}
    stats: dict[str, InputStats] = {}

    def on_input(input_id: str, X: Tensor) -> None:
        if input_id not in widths:
            return
        st = stats.get(input_id)
        if st is None:
            st = stats[input_id] = init_stats(
                widths[input_id], device=X.device, gram=input_id in grams, track_moments=moments and input_id in grams
            )
        accumulate(st, X)

    sums = {"influence": 0.0, "norm": 0.0, "tokens": 0.0}
    with adapter.input_hooks(block, on_input):
        for b, x, ctx in _batches(adapter, cache, rt):
            y = adapter.block_forward(block, x, ctx)
            n = x.shape[0] * x.shape[1]
            sums["influence"] += block_influence(x, y) * n
            sums["norm"] += float(y.double().square().sum())
            sums["tokens"] += n
            cache.put(b, y)
    return _reduce(stats, sums, rt)


def _batches(adapter: ArchAdapter, cache, rt) -> Iterator[tuple[int, Tensor, dict]]:
    ctxs: dict[int, dict] = {}
    for b in range(cache.num_batches()):
        x = cache.get(b)
        ctx = ctxs.get(x.shape[0])
        if ctx is None:
            ctx = ctxs[x.shape[0]] = adapter.forward_context(x.shape[0], x.shape[1], device=rt.device, dtype=rt.dtype)
        yield b, x, ctx


def _dist(rt):
    return getattr(rt, "dist", None)


def _reduce(stats: dict[str, InputStats], sums: dict[str, float], rt) -> tuple[dict[str, InputStats], dict]:
    """Sum statistics and scalars over ranks (no-op with one process)."""
    info = _dist(rt)
    if info is None or not info.enabled:
        return stats, sums
    from engine.distributed import reduce_stats
    from sharding.dist import all_reduce_floats

    stats = reduce_stats(stats, info, rt.device)
    return stats, dict(zip(sums, all_reduce_floats(list(sums.values()), info)))


def _reduce_float(value: float, rt) -> float:
    info = _dist(rt)
    if info is None or not info.enabled:
        return value
    from sharding.dist import all_reduce_floats

    return all_reduce_floats([value], info)[0]


# --------------------------------------------------------------------------------------------- OWL and scores


def _norms(stats: dict[str, InputStats], spec: LinearSpec) -> Tensor | None:
    st = stats.get(spec.input_id)
    return None if st is None or st.n == 0 else col_norm_sq(st)


def _outlier_ratio(
    adapter: ArchAdapter, block: nn.Module, specs: list[LinearSpec], stats: dict[str, InputStats], M: float
) -> float:
    """OWL's D over the Wanda scores of every linear that saw tokens (two passes: the mean, then the count above
    M·mean; equal to `solvers.allocation.outlier_ratio` of the concatenated scores without concatenating them)."""
    parts = [(s, n) for s in specs if (n := _norms(stats, s)) is not None]
    if not parts:
        return 0.0
    total = count = 0.0
    for s, n in parts:
        S = wanda_scores(adapter.get_weight(block, s), n)
        total += float(S.double().sum())
        count += S.numel()
    threshold = M * total / count
    above = sum(float((wanda_scores(adapter.get_weight(block, s), n) > threshold).sum()) for s, n in parts)
    return above / count


def _role(name: str) -> str:
    return _EXPERT_INDEX.sub("experts.*.", name)


def _weight_score_stats(
    adapter: ArchAdapter, block: nn.Module, specs: list[LinearSpec], stats: dict[str, InputStats], score: str
) -> dict[str, list[float]]:
    """Per linear role: [count, Σ s, Σ s²] of the weight scores (|W| for magnitude, else Wanda)."""
    out: dict[str, list[float]] = {}
    for s in specs:
        W = adapter.get_weight(block, s)
        n = _norms(stats, s)
        S = (W.abs() if score == "magnitude" or n is None else wanda_scores(W, n)).double()
        acc = out.setdefault(_role(s.name), [0.0, 0.0, 0.0])
        acc[0] += S.numel()
        acc[1] += float(S.sum())
        acc[2] += float(S.square().sum())
    return out


# --------------------------------------------------------------------------------------------- structured


@dataclass
class _Order:
    """Removal order of the units of one group (lowest score first) and where to zero them."""

    kind: str
    consumer: LinearSpec
    width: int
    order: Tensor


def _structured_scores(
    adapter: ArchAdapter, block: nn.Module, i: int, stats: dict[str, InputStats], settings: ScoringSettings, norm: float
) -> tuple[list[_Order], dict, dict]:
    """Per selected unit group: the removal order by the stage's score, the score sums per kind, and the layer's
    channel error curve `channel_error` (normalised by Σ‖y‖²; `head_error` is measured by the caller)."""
    from engine.stages.structured import UNIT_KINDS

    specs = {s.name: s for s in adapter.linears(block, i)}
    kinds = {k for u in settings.units for k in UNIT_KINDS[u]}
    orders: list[_Order] = []
    score_stats: dict[str, list[float]] = {}
    channel = torch.zeros(len(CHANNEL_GRID), dtype=torch.float64)
    for g in adapter.units(block, i):
        if g.kind not in kinds:
            continue
        name, width = next((n, w) for n, axis, w in g.members if axis == 1)
        cons = specs[name]
        W = adapter.get_weight(block, cons).float()
        st = stats.get(cons.input_id)
        groups = groups_contiguous(W.shape[1], width)
        usable = st is not None and st.n > 0
        s = group_scores(
            settings.score if usable else "magnitude", W, st if usable else None, groups, percdamp=settings.percdamp
        )
        order = torch.sort(s.cpu(), stable=True).indices
        orders.append(_Order(g.kind, cons, width, order))
        acc = score_stats.setdefault(g.kind, [0.0, 0.0, 0.0])
        acc[0], acc[1], acc[2] = acc[0] + s.numel(), acc[1] + float(s.sum()), acc[2] + float(s.square().sum())
        if g.kind != "kv_group":
            cum = _cumulative_error(W, st.H if usable and st.H is not None else None, width, order) / norm
            channel += cum[torch.tensor([round(f * g.count) for f in CHANNEL_GRID])]
    curves = {"head_error": [], "channel_error": channel.tolist() if any(o.kind != "kv_group" for o in orders) else []}
    return orders, score_stats, curves


def _cumulative_error(W: Tensor, H: Tensor | None, width: int, order: Tensor) -> Tensor:
    """``E(k) = Σ_t ‖W_{:,R_k} x_{t,R_k}‖²`` for the first ``k`` units of `order` removed (``k = 0..n``), from
    ``M = (WᵀW) ⊙ H`` summed over unit blocks: ``E(k) = Σ_{a,b<k} M_u[o_a, o_b]``. Zeros without a Gram (no token
    reached the group: removing it changes nothing the calibration sees)."""
    n = W.shape[1] // width
    if H is None:
        return torch.zeros(n + 1, dtype=torch.float64)
    Wd = W.double()
    M = (Wd.T @ Wd) * H.to(W.device, torch.float64)
    Mu = M.reshape(n, width, n, width).sum(dim=(1, 3)).cpu()
    o = order.cpu()
    C = Mu[o][:, o].cumsum(0).cumsum(1).diagonal()
    return torch.cat([torch.zeros(1, dtype=torch.float64), C])


def _unit_masks(
    adapter: ArchAdapter, block: nn.Module, i: int, orders: list[_Order], remove: dict[str, int]
) -> list[tuple[Tensor, Tensor]]:
    """(weight view, zeroed column index) pairs removing `remove[kind]` units from every group in score order."""
    out = []
    for o in orders:
        k = int(remove.get(o.kind, 0))
        if k <= 0:
            continue
        cols = torch.cat([torch.arange(int(u) * o.width, (int(u) + 1) * o.width) for u in o.order[:k]])
        out.append((adapter.get_weight(block, o.consumer), cols))
    return out


# --------------------------------------------------------------------------------------------- masked forwards


def _weight_masks(
    adapter: ArchAdapter, block: nn.Module, specs: list[LinearSpec], stats: dict[str, InputStats], score: str, S: float
) -> list[tuple[Tensor, Tensor]]:
    """(weight view, boolean prune mask) pairs: every selected linear at sparsity `S` (magnitude: one threshold per
    matrix; Wanda: per row; a linear that saw no token: magnitude)."""
    out = []
    for s in specs:
        W = adapter.get_weight(block, s)
        n = _norms(stats, s)
        res = magnitude_prune(W.float(), S) if score == "magnitude" or n is None else wanda_prune(W.float(), n, S)
        out.append((W, ~res.mask))
    return out


@contextlib.contextmanager
def _zeroed(pairs: list[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Set the selected entries (a column index or a boolean mask) of each weight to zero, restore them on exit."""
    saved = []
    try:
        for W, sel in pairs:
            if sel.dtype == torch.bool:
                sel = sel.to(W.device)
                saved.append((W, sel, W[sel].clone()))
                W[sel] = 0
            else:
                sel = sel.to(W.device)
                saved.append((W, sel, W[:, sel].clone()))
                W[:, sel] = 0
        yield
    finally:
        for W, sel, old in reversed(saved):
            if sel.dtype == torch.bool:
                W[sel] = old
            else:
                W[:, sel] = old


def _masked_error(
    adapter: ArchAdapter, block: nn.Module, cache, rt, pairs: list[tuple[Tensor, Tensor]]
) -> tuple[float, float]:
    """``(Σ_t ‖y'_t − y_t‖², Σ_t ‖y'_t − y_t‖² / ‖y_t‖²)`` over every micro-batch and rank, ``y'`` the block with
    `pairs` zeroed, ``y`` the dense outputs (the cache's outputs)."""
    if not pairs:
        return 0.0, 0.0
    pooled = per_token = 0.0
    with _zeroed(pairs):
        for b, x, ctx in _batches(adapter, cache, rt):
            ref = cache.get_output(b).double()
            d = (adapter.block_forward(block, x, ctx).double() - ref).square().sum(-1)
            pooled += float(d.sum())
            per_token += float((d / ref.square().sum(-1).clamp_min(1e-30)).sum())
    return _reduce_float(pooled, rt), _reduce_float(per_token, rt)
