"""qwentrt: Qwen3-4B-Instruct-2507 on one GPU behind Triton Inference Server."""

__version__ = "0.1.0"
