"""Run by tests/test_llmc.py with the python of llm-compressor's own venv (it imports neither blockprune nor pytest).

    python tests/llmc_client.py quantize PRUNED OUT W4A16|FP8_DYNAMIC   # oneshot quantization of a pruned checkpoint
    python tests/llmc_client.py recipe DENSE OUT RECIPE.yaml             # oneshot with a recipe blockprune wrote

`quantize`: `oneshot(model, recipe=QuantizationModifier(targets="Linear", scheme=..., ignore=["lm_head"]))` (data
free), `save_pretrained(OUT, save_compressed=True)`, then OUT is loaded again with `AutoModelForCausalLM` as it is (logits)
and dequantized (`CompressedTensorsConfig(dequantize=True)`: weights) and compared with PRUNED. `recipe`: the YAML is parsed by llm-compressor, then applied with `oneshot`
to DENSE on a few random token rows. Both print one JSON line (the last line of stdout).
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils.quantization_config import CompressedTensorsConfig

IDS = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(3))


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().float().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    }


def is_2of4(w: torch.Tensor) -> bool:
    return w.shape[1] % 4 == 0 and bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def quantize(pruned: str, out: str, scheme: str) -> dict:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    before = linear_weights(model)
    with torch.no_grad():
        ref = model(IDS).logits
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(pruned).save_pretrained(out)
    with open(f"{out}/config.json") as f:
        qcfg = json.load(f)["quantization_config"]
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # as served: compressed weights
    with torch.no_grad():
        logits = again(IDS).logits
    dense = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    after = linear_weights(dense)  # the dequantized values, W = scale * q
    zeros_before = sum(int((w == 0).sum()) for w in before.values())
    kept = sum(int(((before[n] == 0) & (after[n] == 0)).sum()) for n in before)
    return {
        "scheme": scheme,
        "format": qcfg.get("format"),
        "quant_method": qcfg.get("quant_method"),
        "sparsity_config": qcfg.get("sparsity_config"),
        "linears": len(before),
        "same_names": sorted(before) == sorted(after),
        "zeros_before": zeros_before,
        "zeros_kept": kept,
        "zeros_after": sum(int((w == 0).sum()) for w in after.values()),
        "2of4_before": sum(is_2of4(w) for w in before.values()),
        "2of4_after": sum(is_2of4(w) for w in after.values()),
        "params": sum(w.numel() for w in before.values()),
        "weight_rel_err": max(float((after[n] - before[n]).norm() / before[n].norm()) for n in before),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "logits_rel_err": float((logits - ref).norm() / ref.norm()),
    }


def recipe(dense: str, out: str, path: str) -> dict:
    from llmcompressor import oneshot
    from llmcompressor.recipe import Recipe

    parsed = Recipe.create_instance(path)
    modifiers = [{"class": type(m).__name__, **m.model_dump(exclude_unset=True)} for m in parsed.modifiers]
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    data = {"input_ids": torch.randint(4, 128, (4, 32), generator=torch.Generator().manual_seed(0)).tolist()}
    data["attention_mask"] = [[1] * 32 for _ in range(4)]
    from datasets import Dataset

    oneshot(
        model=model,
        dataset=Dataset.from_dict(data),
        recipe=path,
        pipeline="sequential",
        max_seq_length=32,
        num_calibration_samples=4,
        shuffle_calibration_samples=False,
    )
    weights = linear_weights(model)
    return {
        "modifiers": modifiers,
        "sparsity": {n: float((w == 0).float().mean()) for n, w in weights.items()},
        "is_2of4": {n: is_2of4(w) for n, w in weights.items()},
    }


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    torch.set_num_threads(1)
    result = quantize(*args) if cmd == "quantize" else recipe(*args)
    print(json.dumps(result, default=str))
