import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.tiny_models import build_tiny_checkpoint, tiny_text  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Factory: tiny_ckpt(arch, **overrides) -> Path of a multi-shard checkpoint, cached per session."""
    cache: dict = {}

    def make(arch: str, seed: int = 0, **overrides):
        key = (arch, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny_{arch}")
            cache[key] = build_tiny_checkpoint(arch, d, seed=seed, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """A calibration text file over the tiny tokenizer's characters."""
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(tiny_text(20000, seed=0))
    return p
