"""Quantization: AWQ search (awq.py), the AutoAWQ GEMM int4 layout (pack.py), FP8 KV scales (kv.py)."""
