"""Benchmark suite: every performance claim as a ratio against what a user would otherwise pick.

``make bench`` (``python -m benchmarks``) runs everything that fits the machine and writes
``benchmarks/results/<machine>-<date>.{md,json}``; ``make bench-quick`` is the ≤ 5-minute variant.
Method and the latest table: docs/benchmarks.md.
"""

BENCHMARKS = (
    "model_step",
    "mfu",
    "data_pipeline",
    "engine_overhead",
    "checkpoint_stall",
    "zero_memory",
    "scale_projection",
)
"""Run order; ``scale_projection`` reads figures the earlier ones left in ``Context.shared``."""
