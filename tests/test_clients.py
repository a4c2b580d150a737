"""blockprune outputs in the clients users feed them to (issue 18, item 5), on tiny llamas pruned by the real engine:

| output | how it is built |
|---|---|
| unstructured | SparseGPT 50% (dense shapes, half the weights zero) |
| 2:4 | SparseGPT 2:4 |
| structured | structured 30%, heads + channels, uniform allocation (stock config, smaller widths) |
| nonuniform | structured 30%, softmax allocation (per-layer widths: `modeling_blockprune.py`, `auto_map`) |
| padded | the nonuniform output through `blockprune export --layout padded` (stock shapes, zero-padded; no code) |
| dense | the unpruned source checkpoint (the baseline every client must take) |

- lm-evaluation-harness on a local multiple-choice task (`dataset_path: json`, `data_files` -> a JSONL written here,
  `TaskManager(include_path=...)`), loaded by lm-eval itself (`trust_remote_code=True` for the non-uniform output):
  every per-choice log-likelihood equals ours (engine.load_pruned, no remote code). Without `trust_remote_code` the
  non-uniform output fails to load (config.json keeps the dense widths).
- `blockprune eval MODEL --tasks FILE_OR_DIR` hands the task files to lm-eval's Python API with blockprune's own
  loader (no remote code for any output); without lm_eval it is a one-line error.
- PEFT LoRA: a few training steps (loss falls), save the adapter, reload with `AutoPeftModelForCausalLM` (same
  logits), merge (same function; the merged LoRA targets lose their zeros, the other linears keep them), save and
  reload the merged model (same logits).
- `pipeline("text-generation")` on each output, and the head-pruned uniform output in transformers >= 5.25.

Marked `clients`; each test is skipped with the reason when lm_eval / peft is missing (`pip install -e ".[eval]"`).
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import random
import sys
from pathlib import Path

import pytest
import torch

import engine
from engine.padded import export_padded
from tests.tiny_models import build_tiny_checkpoint, recipe, tiny_text

pytestmark = pytest.mark.clients

KINDS = ("dense", "unstructured", "2:4", "structured", "nonuniform", "padded")
TASK = "bp_tiny_mc"
STRUCT = {"method": "structured", "target": 0.3, "units": ["heads", "channels"], "score": "wanda"}
STAGES = {
    "unstructured": [{"method": "sparsegpt", "sparsity": 0.5}],
    "2:4": [{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}],
    "structured": [{**STRUCT, "allocation": {"rule": "uniform"}}],
    "nonuniform": [{**STRUCT, "allocation": {"rule": "softmax", "temperature": 0.5, "max": 0.7}}],
}
IDS = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(3))


def need(module: str):
    """The module, or skip the test saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"{module} is not installed ({e}): pip install -e '.[eval]'")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """The tiny outputs, pruned by the engine (and the dense source, and the padded export of the non-uniform
    output). The non-uniform one comes from a llama with 4 KV groups so that
    layers can keep different numbers of them; the others from the default tiny llama (4 heads, 2 KV groups: a
    removed group leaves 2 heads, which divide hidden_size, see `test_head_pruned_uniform_output_in_stock_transformers`)."""
    d = tmp_path_factory.mktemp("clients")
    calib = d / "calib.txt"
    calib.write_text(tiny_text(20000, seed=0))
    plain = build_tiny_checkpoint("llama", d / "src", num_hidden_layers=4)
    wide = build_tiny_checkpoint(
        "llama", d / "src_kv4", num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
    )
    outs = {"dense": plain}
    for kind, stages in STAGES.items():
        src = wide if kind == "nonuniform" else plain
        out = d / kind.replace(":", "of")
        engine.prune(src, recipe(src, out, calib, stages))
        outs[kind] = out
    cfg = json.loads((outs["nonuniform"] / "config.json").read_text())
    assert len({json.dumps(e["config"], sort_keys=True) for e in cfg["blockprune"]["layers"]}) > 1
    assert "auto_map" not in json.loads((outs["structured"] / "config.json").read_text())
    export_padded(outs["nonuniform"], d / "padded")
    outs["padded"] = d / "padded"
    assert not list(outs["padded"].glob("*.py"))
    return outs


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A local lm-eval multiple-choice task: 12 questions "which word comes next" over the tiny text's lexicon."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    words = tiny_text(3000, seed=5).split()
    rng = random.Random(0)
    docs = []
    for _ in range(12):
        k = rng.randrange(0, len(words) - 8)
        right = words[k + 6]
        wrong = rng.sample(sorted(set(words) - {right}), 3)
        docs.append({"context": " ".join(words[k : k + 6]), "choices": [right, *wrong], "label": 0})
    data = d / "data" / "mc.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(x) + "\n" for x in docs))
    (d / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return d


def lm_eval_by_path(path: Path, task_dir: Path, trust_remote_code: bool) -> dict:
    """lm-eval loading the checkpoint itself, as `lm_eval --model hf --model_args pretrained=PATH,...
    --include_path DIR --tasks bp_tiny_mc` does."""
    lm_eval = need("lm_eval")
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(path), "dtype": "float32", "trust_remote_code": trust_remote_code},
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        device="cpu",
        batch_size=4,
        bootstrap_iters=0,
        log_samples=True,
    )


@torch.no_grad()
def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as lm-eval's HFLM does (the pair encoded whole, the context's
    tokens cut off; no BOS)."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    n = len(tok(context, add_special_tokens=False).input_ids)
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    pos = torch.arange(n - 1, len(whole) - 1)
    return float(logp[pos, ids[0, pos + 1]].sum())


def our_model(path: Path):
    from transformers import AutoTokenizer

    return engine.load_pruned(str(path), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------------------------------- lm-eval


@pytest.mark.parametrize("kind", KINDS)
def test_lm_eval_local_task(kind, outputs, task_dir):
    res = lm_eval_by_path(outputs[kind], task_dir, trust_remote_code=kind == "nonuniform")
    acc = res["results"][TASK]["acc,none"]
    samples = res["samples"][TASK]
    assert len(samples) == 12 and 0.0 <= acc <= 1.0
    model, tok = our_model(outputs[kind])
    correct = 0
    for s in samples:
        ours = [loglikelihood(model, tok, ctx, cont) for ctx, cont in s["arguments"]]
        theirs = [r[0][0] for r in s["resps"]]
        assert ours == pytest.approx(theirs, abs=2e-3), (kind, s["doc"])
        correct += int(max(range(len(ours)), key=ours.__getitem__) == s["doc"]["label"])
    assert acc == pytest.approx(correct / len(samples))


def test_lm_eval_nonuniform_without_trust_remote_code_fails(outputs, task_dir):
    """config.json keeps the dense widths, so the stock class cannot take the smaller tensors (a padded layout, which
    stock transformers loads, passes `test_lm_eval_local_task[padded]` without it)."""
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        lm_eval_by_path(outputs["nonuniform"], task_dir, trust_remote_code=False)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from launch.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_tasks_hands_off_to_lm_eval(outputs, task_dir, capsys):
    need("lm_eval")
    path = outputs["nonuniform"]  # blockprune's loader: no trust_remote_code needed
    rc, out, err = _cli(["eval", str(path), "--tasks", str(task_dir), "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert res["tasks"] == [TASK] and res["n_samples"][TASK] == 12
    model, tok = our_model(path)
    docs = [json.loads(line) for line in (task_dir / "data" / "mc.jsonl").read_text().splitlines()]
    correct = 0
    for doc in docs:
        ll = [loglikelihood(model, tok, doc["context"], " " + c) for c in doc["choices"]]
        correct += int(max(range(len(ll)), key=ll.__getitem__) == doc["label"])
    assert res["results"][TASK]["acc,none"] == pytest.approx(correct / len(docs))

    rc, out, err = _cli(["eval", str(outputs["2:4"]), "--tasks", str(task_dir / f"{TASK}.yaml")], capsys)
    assert rc == 0, err
    assert out.startswith("lm-eval ") and f"{TASK}" in out and " acc " in out, out


def test_eval_tasks_errors_are_one_line(outputs, task_dir, capsys, monkeypatch, tmp_path):
    path = str(outputs["unstructured"])
    cases = [
        (["eval", path], "needs --data TEXT (perplexity) or --tasks"),
        (["eval", path, "--tasks", str(tmp_path / "nope.yaml")], "task file or directory not found"),
        (["eval", path, "--tasks", str(tmp_path / "empty")], "no lm-eval task"),
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.yaml").write_text("- a list\n")
    cases.append((["eval", path, "--tasks", str(tmp_path / "x.yaml")], "not an lm-eval task file"))
    for argv, message in cases:
        rc, _, err = _cli(argv, capsys)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    rc, _, err = _cli(["eval", path, "--tasks", str(task_dir)], capsys)
    assert rc == 2 and "pip install 'blockprune[eval]'" in err and len(err.strip().splitlines()) == 1, err


# -------------------------------------------------------------------------------------------------------- PEFT


LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _zero_fraction(model, suffix: str) -> float:
    ws = [p for n, p in model.named_parameters() if n.endswith(f"{suffix}.weight")]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_lora_train_save_reload_merge(kind, outputs, tmp_path):
    peft = need("peft")
    from transformers import AutoModelForCausalLM

    path, remote = outputs[kind], kind == "nonuniform"
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=remote)
    shapes = {n: p.shape for n, p in base.named_parameters()}
    zeros = {s: _zero_fraction(base, s) for s in ("down_proj", "o_proj")}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        trained = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")

    again = peft.AutoPeftModelForCausalLM.from_pretrained(
        tmp_path / "adapter", dtype=torch.float32, trust_remote_code=remote
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, trained)
    merged = again.merge_and_unload()
    with torch.no_grad():
        logits = merged(IDS).logits
    torch.testing.assert_close(logits, trained, rtol=1e-4, atol=1e-4)
    assert {n: p.shape for n, p in merged.named_parameters()} == shapes
    # merging W + BA fills the zeros of the LoRA targets (N:M patterns too); untouched linears keep theirs
    assert _zero_fraction(merged, "o_proj") == zeros["o_proj"]
    if kind in ("unstructured", "2:4"):
        assert zeros["down_proj"] >= 0.5 and _zero_fraction(merged, "down_proj") < 0.01

    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32, trust_remote_code=remote)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)


def test_peft_nonuniform_adapter_without_task_type(outputs, tmp_path):
    """Without `task_type`, PEFT records the base model's class and module (`transformers_modules.<...>.
    modeling_blockprune`) in the adapter, and `AutoPeftModelForCausalLM` refuses that module (import allowlist);
    `PeftModel.from_pretrained` on a base loaded by the user works."""
    peft = need("peft")
    from transformers import AutoModelForCausalLM

    path = outputs["nonuniform"]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=True)
    cfg = peft.LoraConfig(r=4, target_modules=LORA_TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(base, cfg).eval()
    with torch.no_grad():
        ref = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="import allowlist"):
        peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", trust_remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=True)
    again = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, ref)


# ------------------------------------------------------------------------------------------------ transformers


def _pipeline_log(model, tok) -> tuple[list[int], str]:
    from transformers import pipeline

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        pipe = pipeline("text-generation", model=model, tokenizer=tok)
        ids = pipe("abc", min_new_tokens=4, max_new_tokens=4, do_sample=False, return_tensors=True)
    finally:
        logger.removeHandler(handler)
    return ids[0]["generated_token_ids"], buf.getvalue()


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_text_generation_supports_the_model(kind, outputs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = outputs[kind]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=kind == "nonuniform")
    tok = AutoTokenizer.from_pretrained(path)
    ids, log = _pipeline_log(model, tok)
    prompt = tok("abc").input_ids
    assert ids[: len(prompt)] == prompt and len(ids) == len(prompt) + 4, ids
    assert "is not supported for text-generation" not in log, log[:300]


@pytest.mark.parametrize("target", [0.1, 0.3])
def test_head_pruned_uniform_output_in_stock_transformers(target, tmp_path):
    """transformers >= 5.25's LlamaConfig requires hidden_size % num_attention_heads == 0 even with head_dim set:
    the plan removes only KV-group counts the stock config accepts (`engine.units.kv_removals`: 8 heads in 4 groups
    at hidden 64 -> 8, 4 or 2 heads, never 6), so a uniform head-pruned output always loads."""
    from transformers import AutoModelForCausalLM

    src = build_tiny_checkpoint("llama", tmp_path / "src", num_attention_heads=8, num_key_value_heads=4)
    calib = tmp_path / "calib.txt"
    calib.write_text(tiny_text(20000, seed=0))
    out = tmp_path / "out"
    engine.prune(
        src,
        recipe(src, out, calib, [{**STRUCT, "target": target, "units": ["heads"], "allocation": {"rule": "uniform"}}]),
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0 and cfg["num_attention_heads"] in (2, 4, 8), cfg
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
