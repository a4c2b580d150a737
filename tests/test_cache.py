"""engine.cache.ActivationCache: identical values on every tier, micro-batch edges, double buffering, cleanup, RSS."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine.cache import ActivationCache, choose_tier, default_budgets

N, L, H = 7, 5, 6  # 7 samples in micro-batches of 3: 3, 3, 1
BUDGETS = {"device": (None, None), "host": (0, None), "disk": (0, 0)}  # (device_budget_bytes, host_budget_bytes)


def make_cache(tier: str, dtype: torch.dtype, spill_dir: Path, device: str = "cpu", micro_batch: int = 3):
    dev_budget, host_budget = BUDGETS[tier]
    return ActivationCache(
        N,
        L,
        H,
        dtype=dtype,
        device=device,
        micro_batch=micro_batch,
        device_budget_bytes=dev_budget,
        host_budget_bytes=host_budget,
        spill_dir=str(spill_dir),
    )


def block(x: torch.Tensor, r: int) -> torch.Tensor:
    """A stand-in for a decoder block: computed in float32, stored in the cache dtype."""
    return torch.tanh(x.float() * 1.3 + r) - 0.1 * x.float().flip(-1)


def run_rounds(cache: ActivationCache, X0: torch.Tensor, rounds: int) -> torch.Tensor:
    """Fill with X0, then `rounds` times: read every batch, write block(batch), check inputs are intact, swap."""
    for b in range(cache.num_batches()):
        start, stop = cache.batch_range(b)
        cache.put(b, X0[start:stop])
    cache.swap()
    for r in range(rounds):
        inputs = [cache.get(b).clone() for b in range(cache.num_batches())]
        for b in reversed(range(cache.num_batches())):  # outputs written while earlier inputs are still unread
            cache.put(b, block(cache.get(b), r))
        for b, x in enumerate(inputs):
            assert torch.equal(cache.get(b), x), "inputs changed before swap()"
        cache.swap()
    return torch.cat([cache.get(b) for b in range(cache.num_batches())])


def reference(X0: torch.Tensor, dtype: torch.dtype, rounds: int) -> torch.Tensor:
    X = X0.to(dtype)
    for r in range(rounds):
        X = block(X, r).to(dtype)
    return X


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tier", list(BUDGETS))
def test_tiers_give_identical_values(tier: str, dtype: torch.dtype, tmp_path: Path) -> None:
    X0 = torch.randn(N, L, H, generator=torch.Generator().manual_seed(0))
    with make_cache(tier, dtype, tmp_path) as cache:
        assert cache.tier == tier and cache.num_batches() == 3
        assert [cache.batch_range(b) for b in range(3)] == [(0, 3), (3, 6), (6, 7)]
        out = run_rounds(cache, X0, rounds=3)
    assert out.dtype == dtype and out.shape == (N, L, H)
    assert torch.equal(out, reference(X0, dtype, rounds=3))


@pytest.mark.parametrize("micro_batch", [1, 2, 7, 50])
def test_micro_batch_sizes(micro_batch: int, tmp_path: Path) -> None:
    X0 = torch.randn(N, L, H, generator=torch.Generator().manual_seed(1))
    with make_cache("disk", torch.float32, tmp_path, micro_batch=micro_batch) as cache:
        assert cache.num_batches() == -(-N // min(micro_batch, N))
        assert cache.batch_range(cache.num_batches() - 1)[1] == N
        assert torch.equal(run_rounds(cache, X0, rounds=2), reference(X0, torch.float32, rounds=2))


def test_tier_choice_counts_both_buffers() -> None:
    nbytes = 2 * N * L * H * 2  # two bf16 buffers
    assert choose_tier(nbytes, nbytes, 0) == "device"
    assert choose_tier(nbytes, nbytes - 1, nbytes) == "host"
    assert choose_tier(nbytes, nbytes - 1, nbytes - 1) == "disk"
    assert choose_tier(nbytes, None, 0) == "device" and choose_tier(nbytes, 0, None) == "host"
    cache = ActivationCache(
        N,
        L,
        H,
        dtype=torch.bfloat16,
        device="cpu",
        micro_batch=2,
        device_budget_bytes=nbytes - 1,
        host_budget_bytes=nbytes,
    )
    assert cache.tier == "host" and cache.nbytes() == nbytes
    cache.close()
    dev, host = default_budgets("cpu")
    assert 0 < dev <= host


def _open_spill_files(directory: Path) -> list[int]:
    """Sizes of this process's open files under `directory` (the disk tier's nameless files show as
    ``/proc/self/fd/N -> DIR/#123 (deleted)`` or ``DIR/blockprune-acts-... (deleted)``)."""
    sizes = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(directory)) and target.endswith("(deleted)"):
            sizes.append(os.fstat(int(fd.name)).st_size)
    return sizes


def test_disk_files_are_nameless_and_closed_with_the_cache(tmp_path: Path) -> None:
    with make_cache("disk", torch.bfloat16, tmp_path) as cache:
        assert cache.spill_path == str(tmp_path)
        assert list(tmp_path.iterdir()) == []  # nothing named: nothing a crash could leave behind
        assert sorted(_open_spill_files(tmp_path)) == [cache.nbytes() // 2] * 2
    assert _open_spill_files(tmp_path) == [] and list(tmp_path.iterdir()) == []
    cache.close()  # idempotent
    cache = make_cache("disk", torch.bfloat16, tmp_path)
    assert len(_open_spill_files(tmp_path)) == 2
    del cache
    gc.collect()
    assert _open_spill_files(tmp_path) == []


def test_disk_tier_leaves_nothing_after_kill_9(tmp_path: Path) -> None:
    """A process killed by SIGKILL (the OOM killer, a scheduler's hard kill) with a filled disk tier leaves no file."""
    code = (
        "import os, signal, sys, torch\n"
        "from engine.cache import ActivationCache\n"
        f"c = ActivationCache(4, 8, 16, micro_batch=2, dtype=torch.float32, device='cpu', device_budget_bytes=0,"
        f" host_budget_bytes=0, spill_dir={str(tmp_path)!r})\n"
        "assert c.tier == 'disk'\n"
        "c.put(0, torch.ones(2, 8, 16)); c.put(1, torch.ones(2, 8, 16))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.iterdir()) == []


def test_misuse_raises_clear_errors(tmp_path: Path) -> None:
    cache = make_cache("host", torch.float32, tmp_path)
    with pytest.raises(RuntimeError, match=r"no inputs yet"):
        cache.get(0)
    with pytest.raises(ValueError, match=r"micro-batch 2 has shape \(3, 5, 6\), expected \(1, 5, 6\)"):
        cache.put(2, torch.zeros(3, L, H))
    with pytest.raises(IndexError, match=r"micro-batch 3 out of range \[0, 3\)"):
        cache.put(3, torch.zeros(1, L, H))
    cache.put(0, torch.zeros(3, L, H))
    with pytest.raises(RuntimeError, match=r"outputs of micro-batches \[1, 2\] were never put"):
        cache.swap()
    cache.close()
    with pytest.raises(RuntimeError, match="closed"):
        cache.get(0)
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        ActivationCache(
            N, L, H, dtype=torch.float32, device="cpu", micro_batch=0, device_budget_bytes=None, host_budget_bytes=None
        )


RSS_SCRIPT = textwrap.dedent(
    """
    import json, re, sys, torch
    from engine.cache import ActivationCache

    n, L, H, mb = 50, 512, 1024, 2  # float32: 105 MB per buffer, 210 MB in all; 4 MB per micro-batch

    def peak_mb():  # VmHWM, not getrusage: ru_maxrss also carries the parent's peak across fork + exec
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) / 1024

    def reset_peak():  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak_mb()

    def run(tier, budgets):
        base = reset_peak()
        with ActivationCache(n, L, H, dtype=torch.float32, device="cpu", micro_batch=mb, spill_dir=sys.argv[1],
                             device_budget_bytes=budgets[0], host_budget_bytes=budgets[1]) as cache:
            for b in range(cache.num_batches()):
                cache.put(b, torch.full((mb, L, H), float(b)))
            cache.swap()
            for b in range(cache.num_batches()):
                cache.put(b, cache.get(b) + 1000.0)
            cache.swap()
            ok = all(bool((cache.get(b) == b + 1000.0).all()) for b in range(cache.num_batches()))
            assert ok and cache.tier == tier and cache.nbytes() == 2 * n * L * H * 4, tier
        return peak_mb() - base

    torch.full((mb, L, H), 1.0).add(1.0)  # warm up the allocator and kernels
    print(json.dumps({"disk": run("disk", (0, 0)), "host": run("host", (0, None))}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_disk_tier_keeps_rss_bounded(tmp_path: Path) -> None:
    """A 210 MB cache on disk raises peak RSS (VmHWM, reset first) by a few micro-batches; the same cache in host
    memory raises it by >= 200 MB, so the measurement does see a resident cache."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    assert growth["disk"] < 40, growth
    assert growth["host"] > 190, growth
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tier", list(BUDGETS))
def test_tiers_on_cuda(tier: str, tmp_path: Path) -> None:
    X0 = torch.randn(N, L, H, generator=torch.Generator().manual_seed(2)).cuda()
    with make_cache(tier, torch.bfloat16, tmp_path, device="cuda") as cache:
        assert cache.tier == tier
        out = run_rounds(cache, X0, rounds=3)
        assert out.device.type == "cuda"
        if tier == "host":
            assert cache._store.buffers[0].is_pinned()
    assert torch.equal(out, reference(X0, torch.bfloat16, rounds=3))  # same kernels on the same device
