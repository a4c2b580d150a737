"""`engine.report.evaluate` / `blockprune eval`: perplexity against an independent stock-transformers loop, speed and
size fields, `--compare`, the CLI's JSON, and clear errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.report.evaluate import (
    SpeedConfig,
    eval_windows,
    evaluate,
    format_eval,
    model_sizes,
    prompt_ids,
    text_ids,
    time_decode,
)
from launch.cli import main
from tests.tiny_models import tiny_model, tiny_text, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WINDOWS, SEQ_LEN = 4, 64
SPEED = dict(batch=2, prompt_len=24, new_tokens=5, repeats=2)
SPEED_FIELDS = [
    "prefill_ms",
    "prefill_tokens_per_s",
    "decode_ms_per_token",
    "decode_tokens_per_s",
    "generate_ms",
    "peak_rss_mb",
    "model_mb",
]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("evaltext") / "text.txt"
    p.write_text(tiny_text(1500), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def result(tiny_ckpt, text_file) -> dict:
    """One `evaluate` of a dense llama compared with a qwen2_moe, small speed settings."""
    return evaluate(
        tiny_ckpt("llama"),
        text_file,
        windows=WINDOWS,
        seq_len=SEQ_LEN,
        compare=tiny_ckpt("qwen2_moe"),
        device="cpu",
        **SPEED,
    )


def stock_perplexity(path: Path, text: str, windows: int, seq_len: int, model=None) -> float:
    """Independent reference: windows built here (BOS + seq_len-1 text tokens, non-overlapping), the NLL from
    `model(ids, labels=ids).loss` per window, weighted by its predicted-token count (stock transformers' model
    unless `model` is given)."""
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            row = [tok.bos_token_id] + ids[w * (seq_len - 1) : (w + 1) * (seq_len - 1)]
            assert len(row) == seq_len
            x = torch.tensor([row])
            nll += float(model(x, labels=x).loss) * (seq_len - 1)
            count += seq_len - 1
    return math.exp(nll / count)


def test_perplexity_matches_stock_loop(result, tiny_ckpt, text_file):
    text = text_file.read_text(encoding="utf-8")
    for res, arch in ((result, "llama"), (result["compare"], "qwen2_moe")):
        assert res["windows"] == WINDOWS and res["seq_len"] == SEQ_LEN
        assert res["tokens"] == WINDOWS * (SEQ_LEN - 1)
        ref = stock_perplexity(tiny_ckpt(arch), text, WINDOWS, SEQ_LEN)
        assert 1.5 < ref < 1e4  # a real, finite perplexity of a random model over a 128-token vocabulary
        assert res["ppl"] == pytest.approx(ref, rel=1e-4), arch  # acceptance is 1%; we agree to float rounding


def test_compare_json_and_speed_fields(result, tiny_ckpt):
    back = json.loads(json.dumps(result))  # one JSON object; `ppl` is the perplexity
    assert back["ppl"] == result["ppl"] and back["compare"]["ppl"] == result["compare"]["ppl"]
    assert back["model"] == str(tiny_ckpt("llama")) and back["compare"]["model"] == str(tiny_ckpt("qwen2_moe"))
    for res in (back, back["compare"]):
        for f in SPEED_FIELDS:
            assert isinstance(res[f], float) and res[f] > 0, f
        assert res["batch"] == SPEED["batch"] and res["new_tokens"] == SPEED["new_tokens"]
        tokens = SPEED["batch"] * SPEED["prompt_len"]
        assert res["prefill_tokens_per_s"] == pytest.approx(tokens / (res["prefill_ms"] / 1e3))
        assert res["decode_tokens_per_s"] == pytest.approx(SPEED["batch"] / (res["decode_ms_per_token"] / 1e3))
        assert res["device"] == "cpu" and res["dtype"] == "float32"
    dense = tiny_model("llama")
    assert back["params"] == sum(p.numel() for p in dense.parameters()) == back["nonzero"]
    assert back["model_mb"] == pytest.approx(back["params"] * 4 / 2**20)
    table = format_eval(result)
    assert "ratio" in table and f"{result['ppl']:.3f}" in table and f"{result['compare']['ppl']:.3f}" in table


def test_model_sizes_count_zeros():
    model = tiny_model("llama")
    w = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w[:, ::2] = 0
    sizes = model_sizes(model)
    zeros = w.shape[0] * ((w.shape[1] + 1) // 2)
    assert sizes["nonzero"] == sizes["params"] - zeros
    assert sizes["sparsity"] == pytest.approx(zeros / sizes["params"])


def test_windows_are_bos_then_consecutive_text():
    tok = tiny_tokenizer()
    text = tiny_text(300)
    ids = text_ids(tok, text)
    win = eval_windows(tok, text, windows=1000, seq_len=32)  # asks for more than the text holds
    assert win.shape == (ids.numel() // 31, 32)
    assert (win[:, 0] == tok.bos_token_id).all()
    assert torch.equal(win[:, 1:].reshape(-1), ids[: win.shape[0] * 31])
    prompts = prompt_ids(ids[:10], tok.bos_token_id, batch=3, prompt_len=9)  # text repeated to fill the prompts
    assert prompts.shape == (3, 9) and torch.equal(prompts[:, 1:].reshape(-1), ids[:10].repeat(3)[:24])


def test_decode_makes_exactly_new_tokens_even_when_eos_comes_first():
    model = tiny_model("llama")
    prompt = torch.tensor([[1, 10, 11, 12, 13]])
    with torch.no_grad():
        first = int(model(prompt).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first  # greedy decoding would stop after one token
    step, total = time_decode(model, prompt, new_tokens=4)  # raises unless exactly 4 tokens were made
    assert 0 < step < total


def test_short_text_and_missing_model_are_clear_errors(tiny_ckpt, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("abc def", encoding="utf-8")
    with pytest.raises(ValueError, match=r"short\.txt: 7 tokens, fewer than one evaluation window of 64"):
        evaluate(tiny_ckpt("llama"), short, windows=2, seq_len=64, speed=False)
    code = main(["eval", str(tiny_ckpt("llama")), "--data", str(short), "--seq-len", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "short.txt: 7 tokens, fewer than one evaluation window" in err
    code = main(["eval", str(tiny_ckpt("llama")), "--compare", str(tmp_path / "nope"), "--data", str(short)])
    err = capsys.readouterr().err
    assert code == 2 and "nope: not a checkpoint directory (no config.json)" in err
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        SpeedConfig(new_tokens=1).validate()


def small_speed_flags() -> list[str]:
    """Small speed settings for the CLI subprocess."""
    return ["--batch", "1", "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1"]


def test_cli_prints_json(result, tiny_ckpt, text_file):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "launch",
        "eval",
        str(tiny_ckpt("llama")),
        "--data",
        str(text_file),
        "--windows",
        str(WINDOWS),
        "--seq-len",
        str(SEQ_LEN),
        "--json",
        *small_speed_flags(),
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["ppl"] == pytest.approx(result["ppl"], rel=1e-6)  # same windows as the in-process run
    assert res["decode_tokens_per_s"] > 0 and res["prefill_tokens_per_s"] > 0 and "compare" not in res


def test_eval_of_a_nonuniform_checkpoint(tiny_ckpt, calib_file, text_file, tmp_path):
    """A non-uniform output (a removed sublayer: `modeling_blockprune` class) evaluates, and its perplexity is the
    loop's over the model `engine.load_pruned` builds."""
    from engine.config import config_from_dict
    from engine.loader import load_pruned
    from engine.pipeline import run
    from tests.tiny_models import recipe

    out = tmp_path / "nonuniform"
    run(
        config_from_dict(
            recipe(tiny_ckpt("llama"), out, calib_file, [{"method": "depth", "remove": 1, "by": "sublayer"}])
        )
    )
    assert "blockprune" in json.loads((out / "config.json").read_text())
    res = evaluate(out, text_file, windows=2, seq_len=SEQ_LEN, speed=False, device="cpu")
    ref = stock_perplexity(out, text_file.read_text(), 2, SEQ_LEN, model=load_pruned(out, dtype=torch.float32))
    assert res["ppl"] == pytest.approx(ref, rel=1e-4)
