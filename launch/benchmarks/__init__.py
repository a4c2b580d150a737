"""Benchmark scripts (run by hand, never in CI); each rewrites its own section of ``docs/results.md``.

* ``python -m launch.benchmarks.vs_llmcompressor``: blockprune vs llm-compressor's ``oneshot`` on SmolLM2-135M.
* ``python -m launch.benchmarks.smollm2_unstructured``: blockprune's unstructured methods on SmolLM2-135M.
* ``python -m launch.benchmarks.structured_table``: structured 20% on SmolLM2-135M, every score x solver.
* ``python -m launch.benchmarks.allocation_table``: softmax / OWL / uniform allocation on SmolLM2-135M.
* ``python -m launch.benchmarks.moe_planted``: STUN expert pruning on planted-cluster tiny MoE models.
* ``python -m launch.benchmarks.smollm2_distill``: recovery distillation of a structured SmolLM2-135M on ZeRO-3.
* ``python -m launch.benchmarks.ranks``: 1 rank vs 2 ranks (torchrun, gloo) on a random 12-layer llama.
* ``python -m launch.benchmarks.memory_depth``: peak RSS against depth (4 to 24 blocks) of random llamas.

Each publishes its section with `common.publish_section`.
"""
