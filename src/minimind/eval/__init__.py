"""Evaluation: bits-per-byte on held-out text, task accuracy with checkable answers."""
