"""Benchmarks: synthetic prompts, perf_analyzer runs (and, with the speed issue, qwentrt bench)."""
