"""engine.model_check: a checkpoint's config against its tensor headers, before any weight is read (issue 16 items
5 and 7). Each lie is one line naming the key or tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.model_check import check_model, open_checked
from sharding.errors import CheckpointError
from sharding.reader import CheckpointReader
from tests.tiny_models import ARCHS


@pytest.fixture(scope="module")
def llama(tiny_ckpt):
    """(config, shapes, dtypes) of the tiny llama: 3 blocks, hidden 64, vocab 128, intermediate 96, untied."""
    reader = CheckpointReader(tiny_ckpt("llama"))
    infos = {n: reader.info(n) for n in reader.names()}
    return reader.config, {n: i.shape for n, i in infos.items()}, {n: i.dtype for n, i in infos.items()}


def _fails(config, shapes, dtypes, match: str) -> str:
    with pytest.raises(CheckpointError) as info:
        check_model(config, shapes, dtypes, source="/models/m")
    msg = str(info.value)
    assert "\n" not in msg and match in msg, msg
    return msg


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tiny_architecture_passes_and_nothing_is_read(tiny_ckpt, arch):
    reader = open_checked(tiny_ckpt(arch))
    assert reader.bytes_read == 0


@pytest.mark.parametrize("key", ["num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"])
def test_a_missing_size_is_not_guessed(llama, key):
    config, shapes, dtypes = llama
    _fails({k: v for k, v in config.items() if k != key}, shapes, dtypes, f"config.json: {key} is missing")


@pytest.mark.parametrize("value", ["64", 64.0, 0, -64, True, None, [64]])
def test_hidden_size_must_be_a_positive_integer(llama, value):
    config, shapes, dtypes = llama
    match = "hidden_size is missing" if value is None else f"hidden_size = {value!r}: must be an integer >= 1"
    _fails({**config, "hidden_size": value}, shapes, dtypes, match)


def test_vocab_size_and_kv_heads(llama):
    config, shapes, dtypes = llama
    _fails({**config, "vocab_size": "128"}, shapes, dtypes, "vocab_size = '128'")
    _fails({**config, "num_key_value_heads": 3}, shapes, dtypes, "num_key_value_heads = 3 does not divide")


def test_fewer_layers_in_the_config_than_blocks_on_disk(llama):
    config, shapes, dtypes = llama
    msg = _fails({**config, "num_hidden_layers": 2}, shapes, dtypes, "num_hidden_layers = 2, but the checkpoint has")
    assert "block 2" in msg and "model.layers.2." in msg


def test_more_layers_in_the_config_than_blocks_on_disk(llama):
    config, shapes, dtypes = llama
    _fails({**config, "num_hidden_layers": 5}, shapes, dtypes, "no tensor of block 3 ('model.layers.3.*'; 3 of 5")


def test_a_hole_in_the_blocks(llama):
    config, shapes, dtypes = llama
    holed = {n: s for n, s in shapes.items() if not n.startswith("model.layers.1.")}
    _fails(config, holed, dtypes, "no tensor of block 1")


def test_deepseek_multi_token_prediction_layers_are_allowed(llama):
    config, shapes, dtypes = llama
    mtp = {"model.layers.3.input_layernorm.weight": (64,)}
    check_model({**config, "num_nextn_predict_layers": 1}, {**shapes, **mtp}, dtypes)
    _fails({**config, "num_nextn_predict_layers": 0}, {**shapes, **mtp}, dtypes, "has block 3")


def test_non_uniform_outputs_may_lack_blocks_and_have_their_own_widths(llama):
    config, shapes, dtypes = llama
    nonuniform = {**config, "blockprune": {"layers": []}}
    narrow = {n: ((48, 64) if n.endswith("1.mlp.gate_proj.weight") else s) for n, s in shapes.items()}
    check_model(nonuniform, {n: s for n, s in narrow.items() if not n.startswith("model.layers.1.")}, dtypes)
    _fails(config, narrow, dtypes, "intermediate_size = 96, but 'model.layers.1.mlp.gate_proj.weight' is 48x64")


def test_vocab_and_hidden_size_must_match_the_embedding(llama):
    config, shapes, dtypes = llama
    _fails({**config, "vocab_size": 256}, shapes, dtypes, "vocab_size = 256, but the embedding")
    msg = _fails({**config, "hidden_size": 32}, shapes, dtypes, "hidden_size = 32, but the embedding")
    assert "is 64 wide" in msg
    lm = {**shapes, "lm_head.weight": (120, 64)}
    _fails(config, lm, dtypes, "tensor 'lm_head.weight': shape [120, 64] disagrees")
    _fails(config, {**shapes, "model.norm.weight": (32,)}, dtypes, "tensor 'model.norm.weight'")
    no_head = {n: s for n, s in shapes.items() if n != "lm_head.weight"}
    _fails(config, no_head, dtypes, "tie_word_embeddings is false, but there is no 'lm_head.weight'")
    check_model({**config, "tie_word_embeddings": True}, no_head, dtypes)
    no_embed = {n: s for n, s in shapes.items() if n != "model.embed_tokens.weight"}
    _fails(config, no_embed, dtypes, "no embedding tensor 'model.embed_tokens.weight'")


@pytest.mark.parametrize(
    ("code", "match"), [("F8_E4M3", "FP8 weights need the block scales"), ("I8", "integer"), ("U8", "integer")]
)
def test_non_float_weights_are_refused_naming_the_tensor(llama, code, match):
    config, shapes, dtypes = llama
    name = "model.layers.0.self_attn.q_proj.weight"
    msg = _fails(config, shapes, {**dtypes, name: code}, match)
    assert f"tensor {name!r}" in msg and code in msg
    check_model(config, shapes, {**dtypes, name: code}, require_float=False)  # inspect, eval


def _copy(src, dst, edit):
    shutil.copytree(src, dst)
    path = dst / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return dst


def test_open_checked_refuses_pickle_without_suggesting_a_flag_we_lack(tiny_ckpt, tmp_path):
    src = tiny_ckpt("llama")
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="convert it to safetensors first") as info:
        open_checked(d)
    assert "allow_pickle" not in str(info.value)


def test_open_checked_and_unsupported_architectures(tiny_ckpt, tmp_path):
    other = _copy(tiny_ckpt("llama"), tmp_path / "gpt", lambda c: {**c, "model_type": "gpt2", "hidden_size": "x"})
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'; supported: llama"):
        open_checked(other)
    assert open_checked(other, require_supported=False).config["model_type"] == "gpt2"  # inspect and eval
    lying = _copy(tiny_ckpt("llama"), tmp_path / "lying", lambda c: {**c, "hidden_size": "64"})
    with pytest.raises(CheckpointError, match="hidden_size = '64'"):
        open_checked(lying, require_supported=False)
