"""The public ops of fastdd."""

from fastdd.ops.grad_match import METRICS, grad_match_distance

__all__ = ["METRICS", "grad_match_distance"]
