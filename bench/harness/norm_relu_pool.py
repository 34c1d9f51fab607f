"""instance_norm_relu_pool forward + backward against the eager GroupNorm + ReLU + AvgPool2d; and
conv_instance_norm_relu_pool (the whole first block) against the eager Conv2d + GroupNorm + ReLU + AvgPool2d.

Shapes of ConvNet-3's first two blocks on a real batch of 256 images (32 x 32 and 16 x 16 maps, width 128),
in float32 and in bfloat16 (the ``real_precision="bfloat16"`` pass); the whole first block on 256
Fashion-MNIST images (1 x 28 x 28, padding 3), whose input needs no gradient, float32.
"""

from __future__ import annotations

from functools import partial

import torch

from fastdd.ops import conv_instance_norm_relu_pool, instance_norm_relu_pool, naive
from harness.measure import Calls, Case

SHAPES = [(256, 128, 32, 32), (256, 128, 16, 16)]
DTYPES = [torch.float32, torch.bfloat16]


def _setup(shape: tuple[int, int, int, int], dtype: torch.dtype, device: str) -> Calls:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_(True)
    weight, bias = (torch.randn(shape[1], generator=g).to(device).requires_grad_(True) for _ in range(2))
    grad_out = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, generator=g).to(device, dtype)

    def grads_of(fn):
        return lambda: torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), grad_out)

    return Calls(grads_of(instance_norm_relu_pool), grads_of(naive.instance_norm_relu_pool))


def _first_block_setup(device: str) -> Calls:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 28, 28, generator=g).to(device)
    params = [torch.randn(shape, generator=g).to(device).requires_grad_(True)
              for shape in ((128, 1, 3, 3), (128,), (128,), (128,))]
    grad_out = torch.randn(256, 128, 16, 16, generator=g).to(device)

    def grads_of(fn):
        return lambda: torch.autograd.grad(fn(x, *params, 3), params, grad_out)

    return Calls(grads_of(conv_instance_norm_relu_pool), grads_of(naive.conv_instance_norm_relu_pool))


def cases(device: str) -> list[Case]:
    blocks = [Case(op="instance_norm_relu_pool", name=f"{list(shape)} {str(dtype).removeprefix('torch.')}",
                   baseline_name="eager group_norm, relu, avg_pool2d", setup=partial(_setup, shape, dtype, device))
              for shape in SHAPES for dtype in DTYPES]
    return [*blocks, Case(op="conv_instance_norm_relu_pool", name="[256, 1, 28, 28] -> 128, pad 3, float32",
                          baseline_name="eager conv2d, group_norm, relu, avg_pool2d",
                          setup=partial(_first_block_setup, device))]
