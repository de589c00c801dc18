"""MiniMind: a small Qwen3-shaped language model and its whole training pipeline."""

__version__ = "0.1.0"
