"""Benchmark scripts (run by hand, never in CI); each rewrites its own section of ``docs/results.md``.

* ``python -m launch.benchmarks.vs_llmcompressor``: blockprune vs llm-compressor's ``oneshot`` on SmolLM2-135M.
* ``python -m launch.benchmarks.smollm2_unstructured``: blockprune's unstructured methods on SmolLM2-135M.
"""
