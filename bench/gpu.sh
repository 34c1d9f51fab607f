#!/usr/bin/env bash
# The GPU suite, for any machine with a CUDA GPU, recorded under bench/results/ (each table names the GPU).
#
#     bash bench/gpu.sh           # the op tests with Triton compiled (not interpreted) and the fp16/bf16 cases, then
#                                 # the op microbenchmarks, the matching step and evaluation (Fashion-MNIST and
#                                 # CIFAR-100 shapes), class-batched matching, the plug-ins' overheads, MTT's memory
#     bash bench/gpu.sh --quick   # within 10 minutes on one GPU: the op tests that run Triton or need CUDA, the op
#                                 # microbenchmarks, one DC (IPC 1) and one DM (IPC 10) iteration against the
#                                 # original structure; the benchmarks run even when a test fails, and the script
#                                 # exits with the tests' status
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") quick=0 ;;
    --quick) quick=1 ;;
    *) echo "usage: bash bench/gpu.sh [--quick]" >&2; exit 2 ;;
esac
unset TRITON_INTERPRET
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU')"
if [ "$quick" = 1 ]; then
    tests=0
    python -m pytest -q -p no:cacheprovider -k "triton or cuda" tests/test_grad_match.py tests/test_grad_norm.py \
        tests/test_masked_contrastive.py tests/test_norm_relu_pool.py tests/test_nonfinite_ops.py || tests=$?
    python bench/ops.py --device cuda --repeat 3
    (cd bench && python step.py --device cuda --cases dc-1 dm-10 --repeat 1)
    exit "$tests"
fi
python -m pytest -q tests/test_grad_match.py tests/test_grad_norm.py tests/test_masked_contrastive.py tests/test_matching.py \
    tests/test_norm_relu_pool.py
python bench/ops.py --device cuda
cd bench
python step.py --device cuda --cases dc-1 dc-10 dm-10 eval-10 dc100-1 dc100-10
python class_batching.py --device cuda --cases fmnist-1 fmnist-2 fmnist-5 fmnist-10 fmnist-50 c100-1 c100-10
python sdc_overhead.py --device cuda
python udd_overhead.py --device cuda
python mtt_memory.py --device cuda
