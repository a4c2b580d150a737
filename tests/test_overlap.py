"""Read-ahead and write-behind (engine/overlap.py): the same bytes as inline I/O, errors surface in the main thread,
a crash while a write is pending leaves a resumable output."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.config import config_from_dict
from engine.overlap import BlockIO
from engine.pipeline import run
from sharding.reader import CheckpointReader
from sharding.writer import CheckpointWriter, WriterError
from tests.test_memory_plan import _tensors
from tests.tiny_models import recipe


@pytest.mark.parametrize("stages", [[{"method": "sparsegpt"}], [{"method": "structured", "target": 0.3}]])
def test_overlap_writes_the_same_bytes(stages, tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt("qwen3")
    for name, overlap in (("on", True), ("off", False)):
        rec = recipe(src, tmp_path / name, calib_file, stages)
        rec["runtime"]["overlap"] = overlap
        run(config_from_dict(rec))
    a, b = _tensors(tmp_path / "on"), _tensors(tmp_path / "off")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    on, off = (tmp_path / "on" / "blockprune_manifest.json"), (tmp_path / "off" / "blockprune_manifest.json")
    assert on.read_bytes() == off.read_bytes()


def test_reads_run_ahead_on_another_thread(tiny_ckpt):
    reader = CheckpointReader(tiny_ckpt("llama"))
    from engine.arch import adapter_for

    adapter = adapter_for(reader.config)
    seen: list[str] = []
    real = reader.read

    def spy(names, **kw):
        seen.append(threading.current_thread().name)
        return real(names, **kw)

    reader.read = spy  # type: ignore[method-assign]
    with BlockIO(reader, adapter, [0, 1, 2]) as io:
        first = io.read(0)
        assert set(first) == set(reader.names_with_prefix("model.layers.0."))
        io.read(1), io.read(2)
    assert len(seen) == 3 and all(t.startswith("blockprune-io") for t in seen)


def test_a_failed_write_behind_stops_the_run(tiny_ckpt, calib_file, tmp_path, monkeypatch):
    real = CheckpointWriter.write_unit

    def failing(self, name, tensors, metadata=None, **kwargs):
        if name == "block.00001":
            raise WriterError("disk full (simulated)")
        return real(self, name, tensors, metadata, **kwargs)

    monkeypatch.setattr(CheckpointWriter, "write_unit", failing)
    cfg = config_from_dict(recipe(tiny_ckpt("llama"), tmp_path / "out", calib_file, [{"method": "wanda"}]))
    with pytest.raises(WriterError, match="disk full"):
        run(cfg)
    monkeypatch.setattr(CheckpointWriter, "write_unit", real)
    rep = run(config_from_dict(recipe(tiny_ckpt("llama"), tmp_path / "out", calib_file, [{"method": "wanda"}])))
    assert [b.get("resumed", False) for b in rep["blocks"]] == [True, False, False]
