"""Block-local reconstruction: after a block is pruned, train its kept weights to reproduce the dense block.

Papers: Wagner, Roux, Zimmer, Pokutta, "A Free Lunch in LLM Compression: Revisiting Retraining after Pruning"
(arXiv 2510.14444) — local reconstruction of each pruned submodel against the dense model's intermediate
activations; reconstructing attention and MLP separately is about the cheapest in memory and as good as any
granularity (better than full retraining). Wanda++ (Yang et al., arXiv 2503.04992) — "regional optimization" of each
decoder block against its dense outputs right after pruning it.

Objective, for a block ``f(x; W)`` whose pruned weights define the fixed mask ``M = 1[W ≠ 0]``::

    min_W  L(W) = Σ_t ‖f(x_t; M ⊙ W) − y_t‖² / Σ_t ‖y_t‖²,        y_t = f_dense(x_t)

over the calibration tokens ``x_t`` held by the activation cache (on the sequential path, the pruned model's inputs)
and the dense block's outputs ``y_t`` on those same inputs (the dense forward of the two-forward path writes them to
the cache's output buffer). Granularity:

    block      f is the whole block, the target y.
    sublayer   (1) attention: h(x) = x + attn(ln1(x)) against the dense h (captured by `DenseIntermediate` during
               the dense forward); (2) MLP: y = h + mlp(ln2(h)) on the pruned and already trained h, against y.

A block without one sublayer (depth pruning) is reconstructed whole either way. Structured or expert-merged blocks
are simply smaller: they have no zeros to keep (any exact zeros they have are kept all the same).

Training: Adam (β = 0.9, 0.999, ε = 1e-8, no weight decay) on float32 master copies of the trainable tensors of one
block (the tensors themselves when the block is float32); the block's own tensors are the masters rounded to their
dtype after every step. Learning rate: linear warm-up over ``warmup·steps`` steps, then linear decay to zero (the
paper's schedule, via the HF Trainer). Each step takes ``batch_size`` calibration samples without replacement from a
permutation drawn from ``torch.Generator().manual_seed(seed)`` (a new permutation each epoch), so a run is
bit-identical on the same machine and thread count. The gradient and the master of every masked entry are zeroed at
every step: pruned weights stay exactly zero. The relative error over all calibration tokens is measured before and
after (no grad); with ``revert`` a (sub)layer whose error grew gets its weights back.

Trainable: every linear weight and bias of the (sub)layer, the fused MoE experts (``gate_up_proj``, ``down_proj``),
the router and the shared expert (and its gate); with ``norms`` (default, as the paper's block-wise fine-tuning) the
RMSNorm weights too. Memory: one block, the float32 masters, their gradients and Adam's two moments, the masks, one
step's activations and, for ``sublayer``, the dense ``h`` of every calibration token (`reconstruct_bytes`).

Usage (how `engine.pipeline.BlockLoop` wires it)::

    capture = DenseIntermediate(block, runner.cache) if needs_intermediate(block, rc) else None
    runner.dense(block, i, request, observers=[*stage_observers, *([capture] if capture else [])])
    ...the stages prune the block...
    section = reconstruct_block(block, runner, rc, intermediate=capture)     # {"before": ..., "after": ...}
    runner.propagate(block, compare=True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from engine.modeling_blockprune import RemovedAttention, RemovedMLP
from engine.schema import ConfigError, choice
from sharding import dist

if TYPE_CHECKING:  # the recipe part is imported by every stage file: keep it light
    from engine.cache import ActivationCache
    from engine.dense_pass import BlockRunner

log = logging.getLogger(__name__)

GRANULARITIES: tuple[str, ...] = ("sublayer", "block")
_ADAM = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


# --------------------------------------------------------------------------------------------- the recipe


@dataclass
class ReconstructConfig:
    """The recipe key ``reconstruct: {steps, lr, granularity, batch_size, warmup, norms, revert, seed}`` of a stage.

    Defaults: the Free Lunch paper trains each submodel with AdamW for 3 epochs of 128 calibration samples at batch
    size 2 (≈ 200 steps), 10 % warm-up then linear decay, and sweeps the learning rate over 1e-7..5e-4
    (Llama-3.1-8B, fp16). ``lr = 1e-4`` is the top of the 1e-5..1e-4 range usual for bf16 LLMs: Adam moves a weight
    by at most ≈ lr a step, ≈ 1e-2 over 200 steps, a fraction of a typical weight (std ≈ 1/√hidden). Measured on
    SmolLM2-135M block 10 (Wanda 50 %, 64 x 128 calibration tokens, 200 steps, error on 8 held-out samples):
    1e-4 took the block's relative output error from 0.0123 to 0.0084, 3e-4 to 0.0069, 1e-3 to 0.0056 (1e-5 on
    16 samples: 0.0119 -> 0.0108; perplexities in docs/guide.md) — small models take larger steps; sweep it. Tiny
    random float32 test models need 1e-3. `steps` is per trained part: `sublayer` runs `steps` for the attention,
    then `steps` for the MLP (each on about half the block). Cost per block: ``steps · batch_size`` sample forwards
    and backwards plus two (`block`) or three (`sublayer`) no-grad passes over the calibration set.
    """

    steps: int = 200
    lr: float = 1e-4
    granularity: str = "sublayer"  # sublayer | block
    batch_size: int = 2  # calibration samples per optimizer step
    warmup: float = 0.1  # fraction of the steps with a linearly growing lr
    norms: bool = True  # also train the RMSNorm weights of the (sub)layer
    revert: bool = True  # put a (sub)layer's weights back when training made its error worse
    seed: int = 0  # the order of the samples

    def validate(self, where: str) -> None:
        """ConfigError (one line naming the key) for a value of the wrong kind or out of range."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), f.type, f"{where}.{f.name}"))
        if self.steps < 1:
            raise ConfigError(f"{where}.steps = {self.steps}: must be >= 1 (leave `reconstruct` out to skip it)")
        if not 0.0 < self.lr < 1.0:
            raise ConfigError(f"{where}.lr = {self.lr}: must be in (0, 1) (Adam step size, e.g. 1e-4)")
        choice([self.granularity], GRANULARITIES, f"{where}.granularity")
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size = {self.batch_size}: must be >= 1")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"{where}.warmup = {self.warmup}: must be in [0, 1)")
        if self.seed < 0:
            raise ConfigError(f"{where}.seed = {self.seed}: must be >= 0")

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): linear warm-up to `lr`, then linear decay towards 0."""
        w = int(self.warmup * self.steps)
        if step < w:
            return self.lr * (step + 1) / w
        return self.lr * (self.steps - step) / (self.steps - w)


def _checked(name: str, value: Any, kind: str, where: str) -> Any:
    """`value` as the field's type (strict: a bool is not a number, a number is not a bool)."""
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
    }[kind]
    if not ok:
        raise ConfigError(f"{where} = {value!r}: expected {'a number' if kind == 'float' else f'a {kind}'}")
    if kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where} = {value!r}: must be a finite number")
    return value


def resolve_reconstruct(value: Any, where: str) -> dict[str, Any] | None:
    """A stage's `reconstruct` recipe value, validated, with every default filled in: None or false -> None (off),
    true -> the defaults, a mapping -> its keys over the defaults. ConfigError for anything else."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{steps: 200, lr: 1e-4}} (or true for the defaults)")
    names = [f.name for f in dataclasses.fields(ReconstructConfig)]
    unknown = sorted(str(k) for k in value if k not in names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
    cfg = ReconstructConfig(**value)
    cfg.validate(where)
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------- sublayers


def has_attention(block: nn.Module) -> bool:
    return not isinstance(block.self_attn, RemovedAttention)


def has_mlp(block: nn.Module) -> bool:
    return not isinstance(block.mlp, RemovedMLP)


def needs_intermediate(block: nn.Module, cfg: ReconstructConfig) -> bool:
    """Whether reconstructing `block` with `cfg` needs the dense ``h`` (sublayer granularity, both sublayers kept)."""
    return cfg.granularity == "sublayer" and has_attention(block) and has_mlp(block)


@contextlib.contextmanager
def only(block: nn.Module, part: str) -> Iterator[nn.Module]:
    """While active, the block's own forward computes one sublayer and its residual: ``part = "attention"`` ->
    ``h = x + attn(ln1(x))`` (the MLP removed); ``"mlp"`` -> ``x + mlp(ln2(x))`` (the attention removed). The removed
    sublayer adds exact zeros, so the two composed are the block's forward."""
    if part == "attention":
        swap: dict[str, nn.Module] = {"mlp": RemovedMLP(), "post_attention_layernorm": nn.Identity()}
    elif part == "mlp":
        swap = {"self_attn": RemovedAttention(block.self_attn.layer_idx), "input_layernorm": nn.Identity()}
    else:
        raise ValueError(f"only: part must be 'attention' or 'mlp', got {part!r}")
    kept = {n: getattr(block, n) for n in swap}
    try:
        for n, m in swap.items():
            setattr(block, n, m)
        yield block
    finally:
        for n, m in kept.items():
            setattr(block, n, m)


def trainable_parameters(block: nn.Module, part: str, norms: bool) -> list[tuple[str, nn.Parameter]]:
    """The floating parameters reconstruction trains in `part` ("attention", "mlp" or "block"): every linear weight
    and bias, fused experts, router, shared expert and its gate; RMSNorm weights only with `norms`."""
    prefixes = {
        "attention": ("self_attn.", "input_layernorm."),
        "mlp": ("mlp.", "post_attention_layernorm."),
        "block": ("",),
    }
    if part not in prefixes:
        raise ValueError(f"trainable_parameters: part must be one of {sorted(prefixes)}, got {part!r}")
    norm_params = {
        f"{m}.{n}" if m else n
        for m, mod in block.named_modules()
        if "norm" in type(mod).__name__.lower()
        for n, _ in mod.named_parameters(recurse=False)
    }
    return [
        (n, p)
        for n, p in block.named_parameters()
        if n.startswith(prefixes[part]) and p.is_floating_point() and (norms or n not in norm_params)
    ]


# --------------------------------------------------------------------------------------------- the dense h


class DenseIntermediate:
    """Observer of the dense forward (`BlockRunner.dense(..., observers=[this])`): stores every micro-batch's
    ``h = x + attn(ln1(x))`` — the input of ``post_attention_layernorm`` — in a buffer ``[N, L, H]`` of the cache's
    dtype, on the device when the activation cache is on the device, else in host memory (pinned for a CUDA device).
    It relies on the dense forward running each micro-batch once, in order (as `BlockRunner.dense` does).
    `reconstruct_block` reads it, overwrites it with the pruned ``h`` and releases it."""

    def __init__(self, block: nn.Module, cache: ActivationCache, device: torch.device | str | None = None) -> None:
        self.block: nn.Module | None = block  # dropped after the dense forward: a stage may replace the block
        self.cache = cache
        self.device = (
            torch.device(device)
            if device is not None
            else (cache.device if cache.tier == "device" else torch.device("cpu"))
        )
        self.buffer: Tensor | None = None
        self.complete = False
        self._next = 0
        self._handle: Any = None

    @staticmethod
    def bytes_for(n_samples: int, seq_len: int, hidden: int, dtype: torch.dtype) -> int:
        """Bytes of the buffer for `n_samples` calibration samples."""
        return n_samples * seq_len * hidden * torch.empty((), dtype=dtype).element_size()

    def __enter__(self) -> DenseIntermediate:
        if self.block is None:
            raise RuntimeError("DenseIntermediate observes one dense forward; make a new one for the next block")
        if self.buffer is None:
            self.buffer = self._alloc()
        self._next, self.complete = 0, False
        self._handle = self.block.post_attention_layernorm.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self._handle = None
        self.block = None
        self.complete = self._next == self.cache.num_batches()

    def _alloc(self) -> Tensor:
        shape, dtype = self.cache.shape, self.cache.dtype
        if self.device.type == "cpu" and self.cache.device.type == "cuda":
            try:
                return torch.empty(shape, dtype=dtype, pin_memory=True)
            except RuntimeError:  # the pinned-memory limit is lower than RAM on some systems
                pass
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.put(self._next, args[0])
        self._next += 1

    def get(self, b: int) -> Tensor:
        """``h`` of micro-batch `b`, on the cache's device."""
        assert self.buffer is not None
        start, stop = self.cache.batch_range(b)
        return self.buffer[start:stop].to(self.cache.device)

    def put(self, b: int, h: Tensor) -> None:
        assert self.buffer is not None
        start, stop = self.cache.batch_range(b)
        self.buffer[start:stop].copy_(h.detach())

    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def release(self) -> None:
        self.buffer = None


# --------------------------------------------------------------------------------------------- training


@dataclass
class _Trainable:
    """One trained tensor: the block's parameter, its float32 master (the parameter itself when it is float32),
    the mask of kept entries (None: nothing to keep at zero) and, with `revert`, a copy of its starting values."""

    name: str
    param: nn.Parameter
    master: Tensor
    mask: Tensor | None
    start: Tensor | None

    @staticmethod
    def of(name: str, p: nn.Parameter, keep_start: bool) -> _Trainable:
        master = p if p.dtype == torch.float32 else p.detach().float()
        zero = p.detach() == 0
        mask = ~zero if p.ndim >= 2 and bool(zero.any()) else None
        return _Trainable(name, p, master, mask, p.detach().clone() if keep_start else None)


class _Samples:
    """Which calibration samples each step trains on: `batch_size` at a time, without replacement, from seeded
    permutations of the ``n`` samples; each step's samples grouped by micro-batch as ``(b, rows)``."""

    def __init__(self, n: int, micro_batch: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.mb, self.bs, self.g = n, micro_batch, min(batch_size, n), generator
        self.perm: list[int] = []

    def next(self) -> list[tuple[int, list[int]]]:
        picked: list[int] = []
        while len(picked) < self.bs:
            if not self.perm:
                self.perm = torch.randperm(self.n, generator=self.g).tolist()[::-1]
            picked.append(self.perm.pop())
        pieces: dict[int, list[int]] = {}
        for i in sorted(picked):
            pieces.setdefault(i // self.mb, []).append(i % self.mb)
        return list(pieces.items())


Source = Callable[[int], Tensor]  # micro-batch index -> [mb, L, H] on the device


def _rows(t: Tensor, rows: list[int]) -> Tensor:
    return t if rows == list(range(t.shape[0])) else t[torch.tensor(rows, device=t.device)]


def _train(
    block: nn.Module,
    runner: BlockRunner,
    part: str,
    cfg: ReconstructConfig,
    inputs: Source,
    targets: Source,
    energy: float,
    samples: _Samples,
) -> tuple[list[_Trainable], dict[str, float]]:
    """`cfg.steps` Adam steps of `part`'s trainable tensors on ``Σ‖f(x) − y‖² / (tokens · energy)`` (the relative
    error of the step's samples; `energy` = mean ``‖y_t‖²`` per token of all calibration tokens). Returns the
    tensors (their `start` copies for `revert`) and the mean loss of the first and last tenth of the steps (mean
    over ranks)."""
    tensors = [_Trainable.of(n, p, cfg.revert) for n, p in trainable_parameters(block, part, cfg.norms)]
    if not tensors:
        return tensors, {}
    masters = [t.master for t in tensors]
    # CUDA: the fused kernel (no per-tensor launches, no temporaries); CPU: one tensor at a time (temporaries of one)
    impl = {"fused": True} if masters[0].is_cuda else {"foreach": False}
    opt = torch.optim.Adam(masters, lr=cfg.lr, **impl, **_ADAM)
    info, seq_len = runner.rt.dist, runner.cache.shape[1]
    losses: list[float] = []
    scope = only(block, part) if part in ("attention", "mlp") else contextlib.nullcontext()
    for t in tensors:
        t.param.requires_grad_(True)
    try:
        with scope, torch.enable_grad():
            for step in range(cfg.steps):
                pieces = samples.next()
                scale = energy * seq_len * sum(len(rows) for _, rows in pieces)
                total = 0.0
                for b, rows in pieces:
                    x, y_ref = _rows(inputs(b), rows), _rows(targets(b), rows)
                    y = runner.forward(block, x, runner.ctx(x.shape[0]))
                    loss = (y.float() - y_ref.float()).square().sum() / scale
                    loss.backward()
                    total += float(loss.detach())
                losses.append(total)
                _step(tensors, opt, cfg.lr_at(step), info)
    finally:
        for t in tensors:
            t.param.requires_grad_(False)
            t.param.grad = None
    k = max(1, len(losses) // 10)
    first, last = dist.all_reduce_floats([sum(losses[:k]) / k, sum(losses[-k:]) / k], info)
    return tensors, {"loss_first": first / info.world_size, "loss_last": last / info.world_size}


def _step(tensors: list[_Trainable], opt: torch.optim.Optimizer, lr: float, info: dist.DistInfo) -> None:
    """Masked float32 gradients (summed over ranks), one Adam step on the masters, masked masters rounded into the
    block's tensors."""
    for group in opt.param_groups:
        group["lr"] = lr
    for t in tensors:
        if t.master is not t.param:
            t.master.grad = None if t.param.grad is None else t.param.grad.float()
            t.param.grad = None
        if info.enabled and t.master.grad is None:  # every rank reduces the same tensors
            t.master.grad = torch.zeros_like(t.master)
        if t.mask is not None and t.master.grad is not None:
            t.master.grad.mul_(t.mask)
    if info.enabled:
        grads = [t.master.grad for t in tensors]
        dist.all_reduce_sum(grads, info)
        for g in grads:
            g.div_(info.world_size)
    opt.step()
    with torch.no_grad():
        for t in tensors:
            if t.mask is not None:
                t.master.mul_(t.mask)
            if t.master is not t.param:
                t.param.copy_(t.master)
    opt.zero_grad(set_to_none=True)


def _restore(tensors: list[_Trainable]) -> None:
    with torch.no_grad():
        for t in tensors:
            assert t.start is not None
            t.param.copy_(t.start)


# --------------------------------------------------------------------------------------------- measuring


class _Error:
    """``Σ‖y − y_ref‖²`` and ``Σ‖y_ref‖²`` (float64 sums) and the token count; `relative` / `energy` over all
    ranks."""

    def __init__(self) -> None:
        self.num = self.den = 0.0
        self.tokens = 0

    def add(self, y: Tensor, ref: Tensor) -> None:
        ref32 = ref.float()
        self.num += float((y.float() - ref32).square().sum(dtype=torch.float64))
        self.den += float(ref32.square().sum(dtype=torch.float64))
        self.tokens += ref.shape[0] * ref.shape[1]

    def reduced(self, info: dist.DistInfo) -> tuple[float, float]:
        """(relative error, energy per token) over every rank."""
        num, den, tokens = dist.all_reduce_floats([self.num, self.den, float(self.tokens)], info)
        energy = den / max(tokens, 1.0)
        return (num / den if den > 0 else 0.0), (energy if energy > 0 else 1.0)  # all-zero targets: plain sums


def _forward(block: nn.Module, runner: BlockRunner, x: Tensor, part: str | None) -> Tensor:
    with only(block, part) if part else contextlib.nullcontext():
        return runner.forward(block, x, runner.ctx(x.shape[0]))


# --------------------------------------------------------------------------------------------- the verb


def reconstruct_block(
    block: nn.Module,
    runner: BlockRunner,
    cfg: ReconstructConfig | dict[str, Any],
    *,
    intermediate: DenseIntermediate | None = None,
) -> dict[str, Any]:
    """Train the kept weights of the pruned `block` (in place) to reproduce the dense block's outputs, as the
    module docstring says. Inputs: ``runner.cache.get(b)``; targets: ``runner.cache.get_output(b)`` (the dense
    block's outputs, left untouched); for ``sublayer`` granularity of a block with both sublayers, `intermediate`
    holds the dense ``h`` captured during the dense forward (it is released here).

    Returns the block's report section: relative output errors over all calibration tokens `before` / `after`
    (after any revert), `granularity`, `steps`, `lr`, `batch_size`, `trainable` (parameters trained), and for
    sublayers an `attention` / `mlp` entry each with its own `before`, `after`, `trainable`, `reverted`, `loss_first`,
    `loss_last`. Deterministic (no timings): the lead may store it in the writer's manifest."""
    if isinstance(cfg, dict):
        cfg = ReconstructConfig(**cfg)
    parts = [p for p, kept in (("attention", has_attention(block)), ("mlp", has_mlp(block))) if kept]
    base = {"granularity": cfg.granularity, "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size}
    if not parts:
        return {**base, "before": None, "after": None, "trainable": 0}
    cache = runner.cache
    n = cache.shape[0]
    samples = _Samples(n, cache.micro_batch, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    try:
        if cfg.granularity == "sublayer" and len(parts) == 2:
            if intermediate is None or intermediate.buffer is None or not intermediate.complete:
                raise ValueError(
                    "reconstruct_block: sublayer granularity needs the dense h: pass a DenseIntermediate that observed "
                    "the dense forward (BlockRunner.dense(..., observers=[capture]))"
                )
            return {**base, **_sublayers(block, runner, cfg, intermediate, samples)}
        return {**base, **_whole(block, runner, cfg, samples)}
    finally:
        if intermediate is not None:
            intermediate.release()


def _whole(block: nn.Module, runner: BlockRunner, cfg: ReconstructConfig, samples: _Samples) -> dict[str, Any]:
    cache, info = runner.cache, runner.rt.dist
    nb = cache.num_batches()

    def error() -> tuple[float, float]:
        e = _Error()
        with torch.no_grad():
            for b in range(nb):
                e.add(_forward(block, runner, cache.get(b), None), cache.get_output(b))
        return e.reduced(info)

    before, energy = error()
    tensors, losses = _train(block, runner, "block", cfg, cache.get, cache.get_output, energy, samples)
    after, _ = error()
    reverted = bool(cfg.revert and tensors and after > before)
    if reverted:
        _restore(tensors)
        after = before
    trainable = sum(t.param.numel() for t in tensors)
    return {"before": before, "after": after, "trainable": trainable, "reverted": reverted, **losses}


def _sublayers(
    block: nn.Module, runner: BlockRunner, cfg: ReconstructConfig, dense_h: DenseIntermediate, samples: _Samples
) -> dict[str, Any]:
    """Attention against the dense h, then the MLP on the pruned h against the dense y: three no-grad passes
    (before; attention after + the pruned h into `dense_h`'s buffer + MLP before; after)."""
    cache, info = runner.cache, runner.rt.dist
    nb = cache.num_batches()

    def attention_pass(store: bool) -> tuple[_Error, _Error]:
        """Errors of h against the dense h and of the block output against the dense y; with `store`, the pruned h
        replaces the dense h (after its error is taken)."""
        eh, ey = _Error(), _Error()
        with torch.no_grad():
            for b in range(nb):
                h = _forward(block, runner, cache.get(b), "attention")
                eh.add(h, dense_h.get(b))
                if store:
                    dense_h.put(b, h)
                ey.add(_forward(block, runner, h, "mlp"), cache.get_output(b))
        return eh, ey

    eh, ey = attention_pass(store=False)
    (h_before, h_energy), (before, y_energy) = eh.reduced(info), ey.reduced(info)
    attn, attn_losses = _train(block, runner, "attention", cfg, cache.get, dense_h.get, h_energy, samples)
    eh, ey = attention_pass(store=True)
    h_after, _ = eh.reduced(info)
    mlp_before, _ = ey.reduced(info)
    attn_reverted = bool(cfg.revert and attn and h_after > h_before)
    if attn_reverted:
        _restore(attn)
        h_after = h_before
        eh, ey = attention_pass(store=True)  # the pruned h of the restored attention
        mlp_before, _ = ey.reduced(info)
    n_attn = sum(t.param.numel() for t in attn)
    del attn
    mlp, mlp_losses = _train(block, runner, "mlp", cfg, dense_h.get, cache.get_output, y_energy, samples)
    ey = _Error()
    with torch.no_grad():
        for b in range(nb):
            ey.add(_forward(block, runner, dense_h.get(b), "mlp"), cache.get_output(b))
    after, _ = ey.reduced(info)
    mlp_reverted = bool(cfg.revert and mlp and after > mlp_before)
    if mlp_reverted:
        _restore(mlp)
        after = mlp_before
    n_mlp = sum(t.param.numel() for t in mlp)
    return {
        "before": before,
        "after": after,
        "trainable": n_attn + n_mlp,
        "attention": {
            "before": h_before,
            "after": h_after,
            "trainable": n_attn,
            "reverted": attn_reverted,
            **attn_losses,
        },
        "mlp": {"before": mlp_before, "after": after, "trainable": n_mlp, "reverted": mlp_reverted, **mlp_losses},
    }


# --------------------------------------------------------------------------------------------- memory


def reconstruct_bytes(
    block: nn.Module,
    micro_batch: int,
    seq_len: int,
    hidden: int,
    dtype: torch.dtype,
    cfg: ReconstructConfig | None = None,
    *,
    n_samples: int = 0,
) -> int:
    """Bytes `reconstruct_block` adds to the device beside the block and the activation cache: the training state
    of the largest trained part (masters, gradients, Adam's moments, masks, `revert` copies), one step's
    activations for backward, the micro-batch copies it reads and, with ``n_samples`` > 0 and sublayer granularity,
    the dense-``h`` buffer of `DenseIntermediate` (which lives on the cache's tier: count it there).

    An upper bound within a factor 3: the tests measure the peak of live tensor bytes of a reconstruction (every
    allocation through the dispatcher) on tiny llama and Mixtral blocks, float32 and bfloat16, both granularities,
    and check ``measured <= estimate <= 3 · measured`` (seen: 1.4 to 2.7; the largest for `sublayer`, whose
    activations are bounded by the whole block's). `block` may be on the `meta` device (shapes only); for a real
    one, its tensors' dtypes count."""
    cfg = cfg or ReconstructConfig()
    item = torch.empty((), dtype=dtype).element_size()
    sublayer = needs_intermediate(block, cfg)
    parts = ["attention", "mlp"] if sublayer else ["block"]
    state = max(_state_bytes(trainable_parameters(block, p, cfg.norms), cfg, dtype) for p in parts)
    rows = min(cfg.batch_size, micro_batch)
    tokens = rows * seq_len
    act = tokens * _activation_bytes_per_token(block, hidden, item)
    io = 2 * micro_batch * seq_len * hidden * item + tokens * hidden * (2 * item + 8)  # reads, rows, float32 diff
    buffer = DenseIntermediate.bytes_for(n_samples, seq_len, hidden, dtype) if sublayer else 0
    return int(state + act + io + buffer)


def _state_bytes(params: list[tuple[str, nn.Parameter]], cfg: ReconstructConfig, dtype: torch.dtype) -> int:
    """Per trained element: Adam's two float32 moments (8), the mask (1, worst case), the float32 gradient (4); for
    a tensor that is not float32 its float32 master (4); with `revert`, the copy of its starting values (its size);
    plus Adam's float32 temporaries and the block-dtype gradient of the largest tensor (while it is converted)."""
    if not params:
        return 0
    total = largest = 0
    for _, p in params:
        p_dtype = dtype if p.is_meta else p.dtype  # a meta block (planning) has the compute dtype's tensors
        item = torch.empty((), dtype=p_dtype).element_size()
        per = 8 + 1 + 4 + (0 if p_dtype == torch.float32 else 4) + (item if cfg.revert else 0)
        total += per * p.numel()
        largest = max(largest, (8 + item) * p.numel())
    return total + largest


def _activation_bytes_per_token(block: nn.Module, hidden: int, item: int) -> int:
    """Bytes saved for backward per token by one block forward (sdpa attention: no ``L × L`` scores), bounded from
    the block's widths: every dense linear's input and output; per routed expert a token visits (`top_k`) its
    input, gate/up output, activation and product, output; the router's logits and weights; the RMSNorms' float32
    copies; the loss's float32 difference."""
    elements = sum(m.in_features + m.out_features for m in block.modules() if isinstance(m, nn.Linear))
    experts = getattr(getattr(block, "mlp", None), "experts", None)
    if experts is not None and hasattr(experts, "gate_up_proj"):
        num_e, two_i, h = experts.gate_up_proj.shape
        top_k = int(getattr(block.mlp, "top_k", None) or getattr(block.mlp.gate, "top_k", None) or num_e)
        elements += top_k * (2 * h + 2 * two_i) + 2 * num_e
    return elements * item + 4 * 4 * hidden + 4 * 4 * hidden


def reconstruct_config(stages: Sequence[Any]) -> ReconstructConfig | None:
    """The block-local reconstruction of a run: the `reconstruct` key of the last stage that has one (the block is
    reconstructed once, after all its stages); None without."""
    found = [s.config.reconstruct for s in stages if getattr(s.config, "reconstruct", None)]
    return ReconstructConfig(**found[-1]) if found else None
