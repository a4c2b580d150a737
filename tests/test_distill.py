"""`blockprune distill`: losses against float64 references, recipe and DeepSpeed-config handling, the data
schedule, and two real 2-process gloo ZeRO-3 runs on tiny pruned Llama checkpoints (uniform with magnitude masks;
non-uniform with self-data and every parameter partitioned)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import ConfigError, config_from_dict
from engine.distill.data import rank_micro_batches, step_indices, training_windows
from engine.distill.keep_masks import partition_slice
from engine.distill.loss import distill_loss, kd_loss, lm_loss
from engine.distill.run import (
    DistillConfig,
    check_inputs,
    distill_config_from_dict,
    load_distill_recipe,
    lr_factor,
)
from engine.distill.zero import deep_merge, student_ds_config, teacher_ds_config
from engine.pipeline import run
from tests.tiny_models import recipe, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- losses


def test_kd_loss_worked_example():
    zt = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    zs = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])
    assert kd_loss(zs, zt, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)


def test_kd_loss_matches_float64_reference_with_mask_and_temperature():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    valid = torch.rand(2, 5, generator=g) > 0.4
    T = 2.5
    ps, pt = (zs[:, :-1].double() / T).log_softmax(-1), (zt[:, :-1].double() / T).log_softmax(-1)
    per = (pt.exp() * (pt - ps)).sum(-1)
    ref = T * T * per[valid].mean()
    torch.testing.assert_close(kd_loss(zs, zt, T, valid).double(), ref, rtol=1e-5, atol=1e-6)
    assert kd_loss(zt, zt, T).item() == pytest.approx(0.0, abs=1e-6)


def test_lm_loss_and_mix():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    ref = torch.nn.functional.cross_entropy(zs[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(lm_loss(zs, ids), ref)
    loss, parts = distill_loss(zs, zt, ids, temperature=1.0, lm_loss_weight=0.25)
    assert loss.item() == pytest.approx(0.75 * parts["kd"] + 0.25 * parts["lm"], rel=1e-6)
    loss0, parts0 = distill_loss(zs, zt, ids, lm_loss_weight=0.0)
    assert "lm" not in parts0 and loss0.item() == pytest.approx(parts0["kd"])


def test_kd_loss_rejects_vocab_mismatch():
    with pytest.raises(ValueError, match="differ"):
        kd_loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, 6))


# ------------------------------------------------------------------------------------------- recipe, configs


def _base(tmp_path: Path, **extra) -> dict:
    return {
        "student": str(tmp_path / "s"),
        "teacher": str(tmp_path / "t"),
        "output": str(tmp_path / "o"),
        "data": str(tmp_path / "d.txt"),
        **extra,
    }


def test_recipe_as_written_and_overrides(tmp_path):
    text = (
        "student: /p/pruned\nteacher: /p/dense\noutput: /p/distilled\ndata: /p/text.txt\nsteps: 200\n"
        "seq_len: 1024\nbatch_size: 8\nlr: 1.0e-4\ndeepspeed: {zero_stage: 3}\n"
    )
    path = tmp_path / "r.yaml"
    path.write_text(text)
    cfg = load_distill_recipe(
        path,
        [
            "steps=50",
            "temperature=2",
            "deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
            "self_data=true",
        ],
    )
    assert (cfg.steps, cfg.seq_len, cfg.batch_size, cfg.lr, cfg.temperature, cfg.self_data) == (
        50,
        1024,
        8,
        1e-4,
        2.0,
        True,
    )
    assert cfg.deepspeed == {"zero_stage": 3, "zero_optimization": {"stage3_param_persistence_threshold": 0}}
    again = distill_config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"stepz": 3}, "unknown key"),
        ({"deepspeed": {"zero_stage": 2}}, "only 3"),
        ({"deepspeed": {"zero_optimization": {"stage": 1}}}, "only 3"),
        ({"deepspeed": {"train_batch_size": 16}}, "batch_size"),
        ({"lm_loss_weight": 1.5}, "lm_loss_weight"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"self_data": True, "prompt_len": 1024}, "prompt_len"),
        ({"warmup_steps": 200}, "warmup_steps"),
    ],
)
def test_recipe_errors(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        distill_config_from_dict(_base(tmp_path, **extra))


def test_recipe_requires_paths(tmp_path):
    data = _base(tmp_path)
    del data["teacher"]
    with pytest.raises(ConfigError, match="teacher"):
        distill_config_from_dict(data)


def test_student_ds_config_merges_overrides():
    cfg = student_ds_config(
        batch_size=8,
        micro_batch=2,
        world=2,
        lr=1e-4,
        weight_decay=0.0,
        grad_clip=1.0,
        overrides={
            "zero_stage": 3,
            "optimizer": {"params": {"lr": 5e-5}},
            "zero_optimization": {"stage3_param_persistence_threshold": 0},
        },
    )
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["train_batch_size"] == 8
    assert cfg["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert cfg["optimizer"]["params"]["lr"] == 5e-5 and cfg["optimizer"]["params"]["torch_adam"] is True
    t = teacher_ds_config(cfg, 2)
    assert "optimizer" not in t and t["zero_optimization"]["stage"] == 3 and t["train_batch_size"] == 4
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}, "d": 4}) == {"a": {"b": 3, "c": 2}, "d": 4}


def test_lr_schedule():
    cfg = DistillConfig("s", "t", "o", "d", steps=10, warmup_steps=2, min_lr_ratio=0.1, lr_schedule="cosine")
    assert [lr_factor(s, cfg) for s in (0, 1)] == pytest.approx([1 / 3, 2 / 3])
    assert lr_factor(2, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(0.1)
    cfg.lr_schedule = "linear"
    assert lr_factor(6, cfg) == pytest.approx(1 - 0.9 * 0.5)
    cfg.lr_schedule = "constant"
    assert lr_factor(9, cfg) == 1.0


def test_check_inputs(tmp_path, tiny_ckpt, calib_file):
    dense = tiny_ckpt("llama")
    other = tiny_ckpt("llama", vocab_size=96)
    cfg = distill_config_from_dict(
        {
            "student": str(dense),
            "teacher": str(dense),
            "output": str(tmp_path / "o"),
            "data": str(calib_file),
            "batch_size": 6,
        }
    )
    assert check_inputs(cfg, 2) == 3
    cfg.micro_batch = 2
    with pytest.raises(ConfigError, match="multiple"):
        check_inputs(cfg, 2)
    cfg.micro_batch, cfg.teacher = None, str(other)
    with pytest.raises(ConfigError, match="vocab_size"):
        check_inputs(cfg, 2)
    # same vocab_size, another tokenizer (two tokens' ids swapped): the KL would compare unrelated ids
    import json as _json
    import shutil

    swapped = tmp_path / "teacher"
    shutil.copytree(dense, swapped)
    tj = _json.loads((swapped / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(_json.dumps(tj))
    cfg.teacher = str(swapped)
    with pytest.raises(ConfigError, match="tokenizers differ"):
        check_inputs(cfg, 2)
    cfg.teacher = str(dense)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        check_inputs(cfg, 2)


def test_cli_bad_recipe_fails_before_spawning(tmp_path):
    from launch.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_base(tmp_path, deepspeed={"zero_stage": 2})))
    assert main(["distill", str(path), "--nproc", "2"]) == 2


# ------------------------------------------------------------------------------------------- data, masks


def test_windows_and_schedule(tmp_path):
    tok = tiny_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text("abc def ghi.\n" * 40)  # ~520 tokens: 16 windows of 32
    ids = training_windows(str(text), 32, 100, 0, tok)
    assert ids.shape == (16, 32) and (ids[:, 0] == tok.bos_token_id).all()
    seen = torch.cat([step_indices(16, 4, s, 0) for s in range(4)])
    assert sorted(seen.tolist()) == list(range(16))  # one epoch covers every window once
    assert not torch.equal(step_indices(16, 4, 0, 0), step_indices(16, 4, 4, 0))  # reshuffled next epoch
    mbs = rank_micro_batches(torch.arange(8), 1, 2, 2)
    assert [m.tolist() for m in mbs] == [[4, 5], [6, 7]]


def test_partition_slice():
    m = torch.tensor([[True, False, True], [False, True, True], [True, True, False]])
    assert partition_slice(m, 5, 0).tolist() == [True, False, True, False, True]
    assert partition_slice(m, 5, 1).tolist() == [True, True, True, False, True]  # 4 real + 1 padding


# ------------------------------------------------------------------------------------------- 2-rank ZeRO-3 runs


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[k] = st.get_tensor(k)
    return out


def _distill(tmp_path: Path, name: str, spec: dict, nproc: int = 2) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-m", "launch", "distill", str(path), "--nproc", str(nproc)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return Path(spec["output"])


def _check_same_format(student: Path, out: Path) -> tuple[dict, dict]:
    a, b = _tensors(student), _tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].shape, a[k].dtype) == (b[k].shape, b[k].dtype), k
    assert json.loads((out / "config.json").read_text()) == json.loads((student / "config.json").read_text())
    return a, b


def _check_masks(a: dict, b: dict, names: list[str]) -> None:
    for k in names:
        zeros = a[k] == 0
        assert zeros.float().mean() >= 0.1, k
        assert (b[k][zeros] == 0).all(), f"{k}: a pruned weight became nonzero"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_ckpt, calib_file):
    """Structured 30% (wanda, closed form) then magnitude 50%: a uniform student with exact-zero masks."""
    root = tmp_path_factory.mktemp("distill_students")
    dense = tiny_ckpt("llama")
    st = root / "structured"
    run(
        config_from_dict(
            recipe(
                dense,
                st,
                calib_file,
                [{"method": "structured", "target": 0.3, "score": "wanda", "solver": "closed_form"}],
            )
        )
    )
    run(config_from_dict(recipe(st, root / "mag", calib_file, [{"method": "magnitude", "sparsity": 0.5}])))
    return dense, root / "mag"


@pytest.mark.slow
def test_distill_uniform_two_ranks(tmp_path, pruned, calib_file):
    from transformers import AutoModelForCausalLM

    dense, student = pruned
    out = _distill(
        tmp_path,
        "uniform",
        {
            "student": str(student),
            "teacher": str(dense),
            "output": str(tmp_path / "out"),
            "data": str(calib_file),
            "steps": 8,
            "seq_len": 32,
            "batch_size": 4,
            "samples": 4,
            "lr": 1.0e-3,
            "deepspeed": {"zero_stage": 3},
            "progress": False,
        },
    )
    records = [json.loads(line) for line in (out / "distill_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
    a, b = _check_same_format(student, out)
    linears = [k for k in a if k.endswith("_proj.weight")]
    _check_masks(a, b, linears)
    assert all(not torch.equal(a[k], b[k]) for k in a), "every tensor should have been trained"
    saved = load_distill_recipe(out / "blockprune_distill.yaml")
    assert saved.student == str(student) and saved.steps == 8
    report = json.loads((out / "distill_report.json").read_text())
    assert report["world_size"] == 2 and report["masked_tensors"] == len(linears)
    model = AutoModelForCausalLM.from_pretrained(out)  # stock transformers
    assert type(model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(
        model.state_dict()["model.layers.0.mlp.down_proj.weight"], b["model.layers.0.mlp.down_proj.weight"]
    )


@pytest.mark.slow
def test_distill_nonuniform_self_data_two_ranks(tmp_path, tiny_ckpt, calib_file):
    """Depth by sublayer (non-uniform, modeling_blockprune.py) with zeros written into one tensor; self-data; no
    persistent parameters (every parameter partitioned, the non-persistent mask path)."""
    import engine

    dense = tiny_ckpt("llama")
    student = tmp_path / "sub"
    run(config_from_dict(recipe(dense, student, calib_file, [{"method": "depth", "by": "sublayer", "remove": 2}])))
    name = "model.layers.0.mlp.down_proj.weight"
    index = json.loads((student / "model.safetensors.index.json").read_text())
    shard = student / index["weight_map"][name]
    tensors = {k: v for k, v in _tensors(student).items() if index["weight_map"][k] == shard.name}
    W = tensors[name]
    tensors[name] = W * (W.abs() > W.abs().median())  # half of it exactly zero
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = _distill(
        tmp_path,
        "nonuniform",
        {
            "student": str(student),
            "teacher": str(dense),
            "output": str(tmp_path / "out"),
            "data": str(calib_file),
            "steps": 2,
            "seq_len": 24,
            "batch_size": 2,
            "lr": 1.0e-3,
            "self_data": True,
            "prompt_len": 16,
            "gen_temperature": 0.7,
            "progress": False,
            "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        },
    )
    a, b = _check_same_format(student, out)
    _check_masks(a, b, [name])
    assert not torch.equal(a[name], b[name])
    assert (out / "modeling_blockprune.py").read_text() == (student / "modeling_blockprune.py").read_text()
    records = [json.loads(line) for line in (out / "distill_log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["generate_s"] > 0 and 0 < r["tokens"] <= 2 * 8 for r in records)
    model = engine.load_pruned(out, dtype=torch.float32)
    assert type(model).__module__.endswith("modeling_blockprune")  # our class (named after the stock one)
    logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()
