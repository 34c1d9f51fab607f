"""The dtypes of the ops whose Triton kernels are compiled for each: read by the ops' argument checks and by the
kernels' lists of specialisations (``fastdd.kernels``, which the ops import), so kept in a module of neither."""

from __future__ import annotations

import torch

NORM_RELU_POOL = (torch.float32, torch.float64, torch.bfloat16)  # instance_norm_relu_pool's x, on every backend
MASKED_CONTRASTIVE_CUDA = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # the features, on CUDA
