"""DeepSpeed ZeRO-3 glue of `blockprune distill`: process group, the generated DeepSpeed configs, partitioned
loading of student and teacher, and the gathered write of the distilled checkpoint.

Loading. Both models are built by `engine.loader.load_pruned` (stock `from_pretrained`, or the non-uniform
`BlockpruneForCausalLM` for checkpoints with a `blockprune` section) while a `transformers` `HfDeepSpeedConfig` of
stage 3 is alive: `from_pretrained` then constructs the model under `deepspeed.zero.Init` (every parameter is
partitioned as soon as its module is built, including the layers the non-uniform class rebuilds) and rank 0 copies
the checkpoint values into the partitions. No rank ever holds an unpartitioned model object; rank 0 reads the
checkpoint's tensors once (transformers' ZeRO-3 loading path).

Writing. One unit per decoder block (plus the non-block tensors): its parameters are gathered on every rank
(`GatheredParameters`), rank 0 maps them to the student's on-disk names (`engine.blocks.memory_to_disk_state`, which
also unfuses MoE experts), casts each tensor to the dtype it has in the student's files, and hands the unit to
`sharding.writer.CheckpointWriter`. So at most one block is gathered at a time.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

NON_BLOCK_UNIT = "non_block"


# --------------------------------------------------------------------------------------------- process group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group(build_shm_op: bool = False) -> tuple[int, int]:
    """Initialise `deepspeed.comm` (gloo on the CPU accelerator, the accelerator's backend otherwise); returns
    `(rank, world_size)`. Without torchrun's variables the process is a world of one.

    `build_shm_op=False` skips DeepSpeed's CPU shared-memory all-reduce op, which only tensor-parallel inference uses
    and whose first build takes ~45 s with ninja."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()),
            }
        )
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # what deepspeed falls back to anyway, without its warning
    if not build_shm_op:
        importlib.import_module("deepspeed.comm.torch")
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    backend = "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if acc.device_name() != "cpu":
        acc.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


# --------------------------------------------------------------------------------------------- configs


def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override` merged in recursively (mappings merge, everything else replaces); a new dict."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def student_ds_config(
    *, batch_size: int, micro_batch: int, world: int, lr: float, weight_decay: float, grad_clip: float, overrides: dict
) -> dict:
    """The generated DeepSpeed config of the student, with the recipe's `deepspeed` overrides merged in.

    `train_batch_size = batch_size = micro_batch · world · gradient_accumulation_steps`; ZeRO stage 3; AdamW
    (betas 0.9/0.95, `torch_adam: true`: torch's AdamW, which needs no compiled op); gradient clipping. The
    shorthand `zero_stage: N` in the overrides sets `zero_optimization.stage`."""
    overrides = dict(overrides)
    stage = overrides.pop("zero_stage", None)
    if stage is not None:
        overrides = deep_merge({"zero_optimization": {"stage": stage}}, overrides)
    base = {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": batch_size // (micro_batch * world),
        "zero_optimization": {"stage": 3},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": weight_decay, "torch_adam": True},
        },
        "gradient_clipping": grad_clip,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return deep_merge(base, overrides)


def teacher_ds_config(student_cfg: dict, world: int) -> dict:
    """Inference config of the teacher: the student's ZeRO section (without optimizer offload) and precision
    sections, no optimizer."""
    zero = {k: v for k, v in student_cfg["zero_optimization"].items() if k != "offload_optimizer"}
    micro = student_cfg["train_micro_batch_size_per_gpu"]
    out = {
        "train_micro_batch_size_per_gpu": micro,
        "train_batch_size": micro * world,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
    }
    for k in ("bf16", "fp16"):
        if k in student_cfg:
            out[k] = student_cfg[k]
    return out


# --------------------------------------------------------------------------------------------- loading


@contextlib.contextmanager
def zero3_loading(ds_config: dict):
    """While active, `from_pretrained` builds models partitioned (`HfDeepSpeedConfig`; module docstring)."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_cfg = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference: hold it here
    try:
        yield hf_cfg
    finally:
        del hf_cfg
        unset_hf_deepspeed_config()


def load_partitioned(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`engine.loader.load_pruned(path)` (call inside `zero3_loading`): uniform and non-uniform checkpoints."""
    from engine.loader import load_pruned

    return load_pruned(path, dtype=dtype)


# --------------------------------------------------------------------------------------------- writing


def _gathered(params: list[nn.Parameter]):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _non_block_state(model: nn.Module, disk_names: set[str]) -> dict[str, torch.Tensor]:
    """Parameters outside the decoder blocks under their names in `model` (the stock on-disk names), restricted to
    those the student's files hold (a tied lm_head is not on disk)."""
    return {
        n: p.data for n, p in model.named_parameters(remove_duplicate=False) if ".layers." not in n and n in disk_names
    }


def write_gathered(model: nn.Module, student_dir: str | Path, writer: Any | None, rank: int) -> list[str]:
    """Gather `model` unit by unit and write it with `writer` (rank 0; None elsewhere) under the student's tensor
    names and dtypes. Collective. Returns the names written (rank 0). ValueError when a tensor of the student's files
    has no counterpart in the model or the reverse."""
    from engine.arch import adapter_for
    from engine.blocks import memory_to_disk_state
    from sharding.reader import CheckpointReader

    reader = CheckpointReader(student_dir)
    adapter = adapter_for(reader.config)
    disk = set(reader.names())
    written: list[str] = []

    def emit(unit: str, state: dict[str, torch.Tensor]) -> None:
        extra = sorted(set(state) - disk)
        if extra:
            raise ValueError(f"distill output: tensors {extra[:5]} are not in the student's files {student_dir}")
        writer.write_unit(unit, {n: t.detach().to("cpu", reader.torch_dtype(n)) for n, t in state.items()})
        written.extend(state)

    top = [p for n, p in model.named_parameters() if ".layers." not in n]
    with _gathered(top):
        if rank == 0:
            emit(NON_BLOCK_UNIT, _non_block_state(model, disk))
    for i, block in enumerate(model.model.layers):
        with _gathered(list(block.parameters())):
            if rank == 0:
                emit(f"block.{i:05d}", memory_to_disk_state(block, adapter.block_prefix(i), adapter.spec))
    if rank == 0:
        missing = sorted(disk - set(written))
        if missing:
            raise ValueError(
                f"distill output: the student's tensors {missing[:5]} ({len(missing)} in all) were not "
                "produced by the model"
            )
    return written
