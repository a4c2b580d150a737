"""Tiny random models of every supported architecture, built with stock transformers and saved as
multi-shard safetensors checkpoints (the same files `save_pretrained` writes for real models).

Used by every test that needs a checkpoint. Deterministic: the same (arch, seed, overrides) give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
DENSE_ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

_EXTRA: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "decoder_sparse_step": 1,
    },
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "head_dim": 16,
    },
    "deepseek_v3": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 24,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "n_group": 1,
        "topk_group": 1,
    },
}


def tiny_config(arch: str, **overrides):
    """A small config of `arch` (a transformers `model_type`); `overrides` replace any field."""
    if arch not in _EXTRA:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {ARCHS}")
    return AutoConfig.for_model(arch, **{**_COMMON, **_EXTRA[arch], **overrides})


def tiny_model(arch: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised float32 model (eval mode). Weights are scaled up from HF's std=0.02 init so that
    activations are far from zero and pruning visibly changes outputs."""
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1]) ** 0.5)
            elif "norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-()"


def tiny_tokenizer(vocab_size: int = 128):
    """A character-level byte-level-BPE fast tokenizer (no merges), built offline: 4 special tokens, then the
    byte-level symbols of space and newline and of `_CHARS`. Being plain byte-level BPE, it tokenizes the same
    whichever class AutoTokenizer picks for the architecture (e.g. Qwen2Tokenizer rebuilds it from vocab/merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["\u0120", "\u010a"] + list(_CHARS)  # byte-level forms of " " and "\n"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({c: 4 + i for i, c in enumerate(symbols[: vocab_size - 4])})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    return fast


def tiny_text(n_words: int = 4000, seed: int = 0) -> str:
    """Deterministic pseudo-text over the tiny tokenizer's characters: words drawn Zipf-like from a fixed lexicon
    of 300 random words (so that there is structure for a model's statistics to see)."""
    g = torch.Generator().manual_seed(seed)
    letters = _CHARS[:26]
    lexicon = []
    for _ in range(300):
        n = int(torch.randint(2, 8, (1,), generator=g))
        lexicon.append("".join(letters[int(i)] for i in torch.randint(0, 26, (n,), generator=g)))
    probs = 1.0 / torch.arange(1, len(lexicon) + 1, dtype=torch.float64)
    idx = torch.multinomial(probs / probs.sum(), n_words, replacement=True, generator=g).tolist()
    lines, line = [], []
    for k, i in enumerate(idx):
        line.append(lexicon[i])
        if (k + 1) % 12 == 0:
            lines.append(" ".join(line) + ".")
            line = []
    return "\n".join(lines + [" ".join(line)]) + "\n"


def save_tiny(model: PreTrainedModel, path: str | Path, max_shard_size: str = "20KB", tokenizer: bool = True) -> Path:
    """Save `model` with `save_pretrained` into `path` as many shards with an index (and a tiny tokenizer)."""
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if tokenizer:
        tiny_tokenizer(model.config.vocab_size).save_pretrained(path)

    n = len(list(path.glob("*.safetensors")))
    assert n >= 5, f"expected a multi-shard checkpoint, got {n} shard(s)"
    return path


def build_tiny_checkpoint(
    arch: str, path: str | Path, seed: int = 0, max_shard_size: str = "20KB", **overrides
) -> Path:
    """Build a tiny model of `arch` and save it as a multi-shard checkpoint in `path`."""
    return save_tiny(tiny_model(arch, seed=seed, **overrides), path, max_shard_size=max_shard_size)


def recipe(model, out, calib, stages, **extra) -> dict:
    """A small recipe dict for pipeline tests on tiny models (8 x 32 calibration tokens, float32, CPU)."""
    return {
        "model": str(model),
        "output": str(out),
        "calibration": {"data": str(calib), "samples": 8, "seq_len": 32, "seed": 0},
        "runtime": {"device": "cpu", "dtype": "float32", "micro_batch": 3, "progress": False},
        "prune": stages,
        "report_plots": False,  # rendering is tested in test_report_render.py; it costs ~1 s a run
        **extra,
    }


def run_killed_before(unit: str, cfg, monkeypatch) -> None:
    """Run the pipeline with `cfg` and die (KeyboardInterrupt, like a kill) just before `unit` is committed."""
    import pytest

    from engine.pipeline import run
    from sharding.writer import CheckpointWriter

    real_write = CheckpointWriter.write_unit

    def dying_write(self, name, tensors, metadata=None, **kwargs):
        if name == unit:
            raise KeyboardInterrupt("simulated kill")
        return real_write(self, name, tensors, metadata, **kwargs)

    monkeypatch.setattr(CheckpointWriter, "write_unit", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(CheckpointWriter, "write_unit", real_write)


# The peak-RSS measurement of the memory-vs-depth tests: a fresh interpreter, the kernel's peak counter (VmHWM) reset
# first, then `engine.pipeline.run(recipe)`; it prints the peak in KiB.
PEAK_RSS_SCRIPT = (
    "import json, sys\nfrom engine.memory import reset_peak_rss\nreset_peak_rss()\n"
    "from engine.config import config_from_dict\nfrom engine.pipeline import run\n"
    "run(config_from_dict(json.loads(sys.argv[1])))\n"
    "from engine.memory import peak_rss_mb\nprint('PEAK', int(peak_rss_mb() * 1024))\n"
)


def peak_rss_kib(recipe: dict, timeout: float = 900) -> int:
    """Peak RSS (KiB) of one pipeline run of ``recipe`` in its own Python process (repository root as cwd)."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, json.dumps(recipe)],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=timeout,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return int(p.stdout.split("PEAK")[-1])


def peak_rss_by_depth(
    tmp_path: Path,
    calib: Path,
    arch: str,
    depths: tuple[int, ...],
    stages: list[dict],
    threads: int | None = None,
    timeout: float = 900,
    **model,
) -> dict[int, int]:
    """{depth: peak RSS KiB} of ``stages`` on a tiny ``arch`` model (``model`` overrides: width, experts, shard size)
    of each depth, 8 x 64 calibration tokens, each run in its own process (`peak_rss_kib`)."""
    peaks = {}
    for layers in depths:
        src = build_tiny_checkpoint(arch, tmp_path / f"m{layers}", num_hidden_layers=layers, **model)
        r = recipe(src, tmp_path / f"o{layers}", calib, stages)
        r["calibration"].update(samples=8, seq_len=64)
        if threads is not None:
            r["runtime"]["threads"] = threads
        peaks[layers] = peak_rss_kib(r, timeout)
    return peaks
