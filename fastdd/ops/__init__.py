"""The public ops of fastdd."""

from fastdd.ops import _backend, calibration
from fastdd.ops.grad_match import METRICS, grad_match_distance
from fastdd.ops.grad_norm import per_sample_grad_norm
from fastdd.ops.masked_contrastive import masked_feature_contrastive
from fastdd.ops.norm_relu_pool import conv_instance_norm_relu_pool, instance_norm_relu_pool

_backend.set_cpu_choice(calibration.choice)  # backend="auto" on CPU: the measured choice

__all__ = ["METRICS", "conv_instance_norm_relu_pool", "grad_match_distance", "instance_norm_relu_pool",
           "masked_feature_contrastive", "per_sample_grad_norm"]
