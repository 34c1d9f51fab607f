// The C++ extension of masked_feature_contrastive: the kernels of masked_contrastive_kernels.h, compiled once per ISA
// level (isa.h), and their bindings.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <cmath>

#define FASTDD_KERNELS "masked_contrastive_kernels.h"
#include "isa.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_levels(m);
  m.def("forward", FASTDD_BY_LEVEL(forward_outputs),
        "loss [], h [N, C], norm [N], g [N, K], inv_msum [N] written from features [N, C, L]");
  m.def("backward", FASTDD_BY_LEVEL(backward_features), "grad_features [N, C, L] written from the outputs of forward");
  m.def("loss", FASTDD_BY_LEVEL(loss),
        "the loss of features [N, C, H, W], flat masks [N, L], labels, prototypes [K, C], as an autograd node");
  m.def("pool_backward", FASTDD_BY_LEVEL(pool_backward),
        "grad_features [N, C, L] = masks[:, None] * scale[:, :, None]");
}
