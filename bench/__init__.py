"""Benchmark: NestedKSampler vs ComfyUI's KSampler at equal NFEs (see bench/run_benchmark.py)."""
