"""The experts stage (STUN) on tiny MoE models with planted clusters of near-duplicate experts.

    python -m launch.benchmarks.moe_planted [--archs mixtral,qwen2_moe,qwen3_moe,deepseek_v3] [--draws 8]
                                            [--threads 1] [--write-results]

Per architecture and case (`CASES`: cluster sizes, top-k, target) a tiny random model (``tests.tiny_models``,
8 routed experts, 4 layers) gets, in every MoE layer, experts in clusters of near-duplicates (`plant_clusters`) and
is saved like every test checkpoint; ``engine.pipeline.run`` prunes it with
``{method: experts, target, similarity: router, representative: centroid}`` in this process. Reported: whether the
clusters found equal the planted ones in every block, and the relative change of the logits
``‖L − L_dense‖ / ‖L_dense‖`` of STUN's choice, of removing whole clusters and of random removals of the same count.
Then the time of the experts stage per block next to the block's statistics forward, on a random Mixtral of larger
width (`time_case`).

The helpers (`plant_clusters`, `experts_logits`) are also used by tests/test_experts_pipeline.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from launch.benchmarks import common

log = logging.getLogger("moe_planted")

SECTION = "moe"
ARCH_EXPERTS = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "deepseek_v3": "n_routed_experts",
}
# Router rows scaled up: sharp routing, so a token's top cluster takes nearly all of its routing weight (softmax
# routers). DeepSeek's sigmoid router saturates (ties at 1.0) when scaled, so it stays mild there.
ROUTER_SCALE = {"deepseek_v3": 2.0}
DEFAULT_ROUTER_SCALE = 40.0
# Expert down_proj scaled down: expert outputs small against the residual stream, so that a change in one block does
# not flip the hard top-k routing of every later block (random tiny models otherwise amplify any change to
# saturation, and every removal looks equally bad).
DOWN_SCALE = 0.2


# ------------------------------------------------------------------------------------------- planted models


def _canonical(labels: list[int]) -> list[int]:
    order = {lab: k for k, lab in enumerate(dict.fromkeys(labels))}
    return [order[lab] for lab in labels]


@torch.no_grad()
def plant_clusters(
    model,
    sizes: list[int] | dict[int, list[int]],
    *,
    noise: float = 1e-3,
    router_scale: float = DEFAULT_ROUTER_SCALE,
    down_scale: float = DOWN_SCALE,
    seed: int = 0,
) -> dict[int, list[int]]:
    """Give every MoE layer of `model` (in place) routed experts in clusters of near-duplicates.

    `sizes`: cluster sizes (summing to the number of experts), or {layer: sizes} (layers left out: all singletons).
    Per layer the experts are assigned to clusters in a random order; each member's fused gate/up/down tensors and
    router row are its cluster's base (the tensors of one expert; down_proj times `down_scale`, router row times
    `router_scale`) plus Gaussian noise of `noise` times the base's RMS. Returns {layer: planted cluster id per expert}, numbered by each cluster's
    smallest expert (the numbering of `solvers.clustering.cluster_experts`)."""
    g = torch.Generator().manual_seed(seed)
    truth = {}
    for i, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        E = experts.gate_up_proj.shape[0]
        layer_sizes = sizes.get(i, [1] * E) if isinstance(sizes, dict) else sizes
        if sum(layer_sizes) != E:
            raise ValueError(f"plant_clusters: layer {i} has {E} experts, cluster sizes {layer_sizes}")
        ids = torch.cat([torch.full((n,), c) for c, n in enumerate(layer_sizes)])
        ids = ids[torch.randperm(E, generator=g)]
        router = layer.mlp.gate.weight
        for T, scale in ((experts.gate_up_proj, 1.0), (experts.down_proj, down_scale), (router, router_scale)):
            base = scale * T[: len(layer_sizes)].clone()  # cluster c copies expert c
            rms = base.reshape(len(layer_sizes), -1).square().mean(1).sqrt()
            shape = (E,) + (1,) * (T.dim() - 1)
            eps = torch.randn(T.shape, generator=g, dtype=T.dtype)
            T.copy_(base[ids] + noise * rms[ids].reshape(shape) * eps)
        truth[i] = _canonical(ids.tolist())
    return truth


@torch.no_grad()
def experts_logits(path: str | Path, ids: torch.Tensor, keep: dict[int, list[int]] | None = None) -> torch.Tensor:
    """Logits of the checkpoint in `path` run block by block by blockprune's adapter (float32, CPU), with only the
    routed experts `keep[i]` (ascending source ids) in block i: `engine.stages.experts.select_experts` into the stock
    layer of the config with that many experts (top_k clipped)."""
    from engine.arch import adapter_for, embed, final_hidden_to_logits
    from engine.stages.experts import adapter_with_experts
    from engine.surgery import select_experts
    from sharding.reader import CheckpointReader

    reader = CheckpointReader(path)
    adapter = adapter_for(reader.config)
    x = embed(ids, reader.read([adapter.embed_key])[adapter.embed_key].float())
    ctx = adapter.forward_context(ids.shape[0], ids.shape[1], device="cpu", dtype=torch.float32)
    for i in range(adapter.num_layers):
        block = adapter.build_block(
            i, reader.read(reader.names_with_prefix(adapter.block_prefix(i))), device="cpu", dtype=torch.float32
        )
        if keep and i in keep:
            block = select_experts(adapter, block, i, keep[i], adapter_with_experts(adapter, len(keep[i])))
        x = adapter.block_forward(block, x, ctx)
    head = adapter.embed_key if adapter.lm_head_key is None else adapter.lm_head_key
    t = reader.read([adapter.final_norm_key, head])
    return final_hidden_to_logits(x, t[adapter.final_norm_key].float(), t[head].float(), adapter.config)


def relative_change(L: torch.Tensor, ref: torch.Tensor) -> float:
    """`‖L − ref‖_F / ‖ref‖_F` in float64."""
    return float((L.double() - ref.double()).norm() / ref.double().norm())


def whole_clusters_removed(truth: list[int], n_remove: int) -> list[int]:
    """Experts kept when whole planted clusters are removed, smallest clusters first then highest id, until
    `n_remove` experts are gone (the last cluster may be cut short); ascending."""
    clusters = sorted(set(truth), key=lambda c: (truth.count(c), -c))
    gone: list[int] = []
    for c in clusters:
        gone += [e for e in range(len(truth)) if truth[e] == c]
        if len(gone) >= n_remove:
            break
    removed = set(gone[:n_remove])
    return [e for e in range(len(truth)) if e not in removed]


def random_keeps(E: int, n_keep: int, layers: list[int], draws: int, seed: int = 0) -> list[dict[int, list[int]]]:
    """`draws` random choices of `n_keep` of `E` experts per layer (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return [{i: sorted(torch.randperm(E, generator=g)[:n_keep].tolist()) for i in layers} for _ in range(draws)]


# ------------------------------------------------------------------------------------------- the benchmark


def build_planted(
    arch: str, path: Path, sizes: list[int] | dict[int, list[int]], top_k: int, layers: int, seed: int = 0, **overrides
) -> dict[int, list[int]]:
    """A planted tiny model of `arch` (`sum(sizes)` experts, top-`top_k`, renormalised top-k, `layers` layers)
    saved with `tests.tiny_models.save_tiny`; returns the planted clusters (`plant_clusters`)."""
    from tests.tiny_models import save_tiny, tiny_model

    E = sum(next(iter(sizes.values())) if isinstance(sizes, dict) else sizes)
    extra = {"norm_topk_prob": True} if arch != "mixtral" else {}
    model = tiny_model(
        arch,
        seed=seed,
        num_hidden_layers=layers,
        num_experts_per_tok=top_k,
        **{ARCH_EXPERTS[arch]: E},
        **extra,
        **overrides,
    )
    truth = plant_clusters(model, sizes, seed=seed, router_scale=ROUTER_SCALE.get(arch, DEFAULT_ROUTER_SCALE))
    save_tiny(model, path)
    return truth


def _recipe(src: Path, out: Path, calib: Path, stages: list[dict], samples: int, seq_len: int, threads: int) -> dict:
    from tests.tiny_models import recipe

    r = recipe(src, out, calib, stages, overwrite=True)
    r["calibration"].update(samples=samples, seq_len=seq_len)
    r["runtime"]["threads"] = threads
    return r


def run_case(arch: str, sizes: list[int], top_k: int, target: float, work: Path, calib: Path, args) -> dict:
    """Plant, prune with the experts stage (router similarity, centroid), and measure (see the module docstring)."""
    from engine.config import config_from_dict
    from engine.pipeline import run

    src, out = work / f"{arch}_top{top_k}_{len(sizes)}", work / f"{arch}_top{top_k}_{len(sizes)}_out"
    truth = build_planted(arch, src, sizes, top_k, layers=4)
    stage = {"method": "experts", "target": target, "similarity": "router", "representative": "centroid"}
    rep = run(config_from_dict(_recipe(src, out, calib, [stage], 16, 64, args.threads)))
    moe = {b["block"]: b["experts"] for b in rep["blocks"] if "experts" in b}
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    dense = experts_logits(src, ids)
    E, n_keep = sum(sizes), next(iter(moe.values()))["after"]
    whole = {i: whole_clusters_removed(truth[i], E - n_keep) for i in moe}
    rand = [relative_change(experts_logits(src, ids, k), dense) for k in random_keeps(E, n_keep, list(moe), args.draws)]
    stun = relative_change(experts_logits(out, ids), dense)
    return {
        "arch": arch,
        "top_k": top_k,
        "sizes": sizes,
        "E": E,
        "n_keep": n_keep,
        "recovered": all(m["clusters"] == truth[i] for i, m in moe.items()) and n_keep == len(sizes),
        "stun": stun,
        "whole": relative_change(experts_logits(src, ids, whole), dense),
        "random": sum(rand) / len(rand),
        "random_min": min(rand),
    }


def time_case(work: Path, calib: Path, args) -> dict:
    """A random (unplanted) Mixtral of real-ish width (hidden 1024, 8 experts of 2816, 2 layers), 32 x 128 tokens,
    `[experts 0.25, wanda 0.25]`: per MoE block the experts stage (decision, surgery) next to the statistics forward
    and the Wanda solve, in ms (median over blocks)."""
    from engine.config import config_from_dict
    from engine.pipeline import run
    from tests.tiny_models import build_tiny_checkpoint

    src = build_tiny_checkpoint(
        "mixtral",
        work / "wide",
        num_hidden_layers=2,
        hidden_size=1024,
        intermediate_size=2816,
        num_local_experts=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_shard_size="50MB",
    )
    stages = [{"method": "experts", "target": 0.25}, {"method": "wanda", "sparsity": 0.25}]
    rep = run(config_from_dict(_recipe(src, work / "wide_out", calib, stages, 32, 128, args.threads)))
    med = lambda xs: sorted(xs)[len(xs) // 2]
    blocks = [b for b in rep["blocks"] if "experts" in b]
    return {
        "decide": med([1e3 * b["time_s"]["experts_decide"] for b in blocks]),
        "surgery": med([1e3 * b["time_s"]["experts_surgery"] for b in blocks]),
        "stats": med([1e3 * b["time_s"]["stats"] for b in blocks]),
        "solve": med([1e3 * b["time_s"]["solve"] for b in blocks]),
        "forward": med([1e3 * b["time_s"]["forward"] for b in blocks]),
    }


CASES = [  # (cluster sizes, top_k, target): the target removes exactly the planted duplicates
    ([2, 2, 1, 1, 1, 1], 1, 0.25),
    ([2, 2, 1, 1, 1, 1], 2, 0.25),
    ([2, 2, 2, 2], 2, 0.5),
]


def table(rows: list[dict]) -> str:
    body = [
        [
            r["arch"],
            r["top_k"],
            "+".join(map(str, r["sizes"])),
            f"{r['E']} → {r['n_keep']}",
            "yes" if r["recovered"] else "**no**",
            f"{r['stun']:.2e}",
            f"{r['whole']:.2e}",
            f"{r['random']:.2e} (min {r['random_min']:.2e})",
            f"{r['random'] / max(r['stun'], 1e-30):.1f}",
        ]
        for r in rows
    ]
    return common.markdown_table(
        [
            "arch",
            "top-k",
            "planted clusters",
            "experts",
            "clusters recovered",
            "Δlogits STUN",
            "Δlogits whole clusters removed",
            "Δlogits random (mean)",
            "random / STUN",
        ],
        body,
    )


def time_table(t: dict) -> str:
    row = [
        f"{t['decide']:.1f}",
        f"{t['surgery']:.1f}",
        f"{t['decide'] + t['surgery']:.1f}",
        f"{t['stats']:.0f}",
        f"{(t['decide'] + t['surgery']) / t['stats']:.3f}",
        f"{t['solve']:.0f}",
        f"{t['forward']:.0f}",
    ]
    return common.markdown_table(
        [
            "decide ms",
            "surgery ms",
            "experts stage ms",
            "stats forward ms",
            "stage / forward",
            "Wanda solve ms",
            "pruned forward ms",
        ],
        [row],
    )


LEGEND = (
    "Recipe: `{method: experts, target, similarity: router, representative: centroid}` with `target` = the planted "
    "duplicates' share. Δlogits = `‖L − L_dense‖ / ‖L_dense‖` over all positions. *whole clusters removed*: the same "
    "number of experts, taken as whole planted clusters. With top-1 (renormalised) routing a kept near-duplicate "
    "takes over its cluster's tokens exactly; with top-2 a token's two picks are the two members of its cluster, so "
    "after pruning its second slot goes to another cluster with the (small, sharp router) weight that cluster gets. "
    "DeepSeek-V3's sigmoid gate gives that second pick nearly equal weight, so there top-2 STUN is only modestly "
    "better than random."
)
TIME_LEGEND = (
    "Time of the experts stage per MoE block against the block's one statistics forward (random Mixtral, hidden "
    "1024, 8 experts of 2816, 2 layers, 32 x 128 calibration tokens, `[experts 0.25, wanda 0.25]`; medians over "
    "blocks). *decide*: distances, clustering and the representatives (the experts' weight Gram in float64); "
    "*surgery*: the rebuilt block with the kept experts; *stats forward*: the dense forward with every hook (the "
    "co-activation counting included); no extra forward is run for the decision."
)


def section_facts(args: argparse.Namespace) -> dict[str, str]:
    return {
        "models": "tiny random MoE models (hidden 64, 4 layers, 8 routed experts; Qwen2-MoE and DeepSeek-V3 with "
        "their shared expert) with planted clusters of near-duplicate experts: expert weights and router rows copied "
        "per cluster plus 1e-3 relative noise; router rows x40 (DeepSeek's sigmoid router x2, it saturates), expert "
        "down_proj x0.2 (`plant_clusters`)",
        "calibration": f"16 x 64 tokens of pseudo-text; logits on 4 x 32 random ids; random removal: mean of "
        f"{args.draws} draws; torch threads {args.threads}",
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m launch.benchmarks.moe_planted",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--archs", default=",".join(ARCH_EXPERTS), help="comma-separated: " + ", ".join(ARCH_EXPERTS))
    p.add_argument("--draws", type=int, default=8, help="random removals averaged")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the runs")
    common.add_results_args(p)
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if not archs or set(archs) - set(ARCH_EXPERTS):
        p.error(f"--archs {args.archs!r}: choose from {', '.join(ARCH_EXPERTS)}")
    common.setup_logging()
    logging.getLogger("sharding").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    load_before = common.load_average()
    from tests.tiny_models import tiny_text

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib = work / "calib.txt"
        calib.write_text(tiny_text(20000, seed=0))
        for arch in archs:
            for sizes, top_k, target in CASES:
                rows.append(run_case(arch, sizes, top_k, target, work, calib, args))
                log.info("%s", json.dumps(rows[-1]))
        timing = time_table(time_case(work, calib, args))
    body = table(rows)
    print(body + "\n\n" + timing)
    if args.write_results:
        common.publish_section(
            SECTION,
            "MoE expert pruning (STUN) on planted tiny models",
            common.command_line("launch.benchmarks.moe_planted", argv),
            LEGEND,
            [body, TIME_LEGEND, timing],
            facts=section_facts(args),
            load_before=load_before,
            path=args.results,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
