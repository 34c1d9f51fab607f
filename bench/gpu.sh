#!/usr/bin/env bash
# The GPU suite, for any machine with a CUDA GPU: the op tests with Triton compiled (not interpreted)
# and the fp16/bf16 cases, then the op microbenchmarks, the matching step and evaluation (Fashion-MNIST
# and CIFAR-100 shapes), class-batched matching, the plug-ins' overheads and MTT's memory on CUDA, recorded under bench/results/.
#
#     bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU')"
python -m pytest -q tests/test_grad_match.py tests/test_grad_norm.py tests/test_masked_contrastive.py tests/test_matching.py \
    tests/test_norm_relu_pool.py
python bench/ops.py --device cuda
cd bench
python step.py --device cuda --cases dc-1 dc-10 dm-10 eval-10 dc100-1 dc100-10
python class_batching.py --device cuda --cases fmnist-1 fmnist-2 fmnist-5 fmnist-10 fmnist-50 c100-1 c100-10
python sdc_overhead.py --device cuda
python udd_overhead.py --device cuda
python mtt_memory.py --device cuda
