#!/usr/bin/env bash
# The GPU suite, for any machine with a CUDA GPU: the op tests with Triton compiled (not interpreted)
# and the fp16/bf16 cases, then the op microbenchmarks on CUDA, recorded under bench/results/.
#
#     bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU')"
python -m pytest -q tests/test_grad_match.py tests/test_grad_norm.py tests/test_masked_contrastive.py
python bench/ops.py --device cuda
