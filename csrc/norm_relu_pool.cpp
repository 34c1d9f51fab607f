// The C++ extension of instance_norm_relu_pool: the kernels of norm_relu_pool_kernels.h, compiled once per ISA level
// (isa.h), and their bindings.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#define FASTDD_KERNELS "norm_relu_pool_kernels.h"
#include "isa.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_levels(m);
  m.def("forward", FASTDD_BY_LEVEL(forward), "out [N, C, H/2, W/2], mean and rstd [N, C] written from x [N, C, H, W]");
  m.def("backward", FASTDD_BY_LEVEL(backward),
        "grad_x [N, C, H, W] and per-plane grad_gamma, grad_beta [N, C] written");
  m.def("forward_nhwc", FASTDD_BY_LEVEL(forward_nhwc), "forward on channels_last x and out");
  m.def("backward_nhwc", FASTDD_BY_LEVEL(backward_nhwc), "backward on channels_last grad_out, x and grad_x");
  m.def("conv_forward", FASTDD_BY_LEVEL(conv_forward), "conv_instance_norm_relu_pool: out, mean and rstd written");
  m.def("conv_backward", FASTDD_BY_LEVEL(conv_backward),
        "per-plane grad_weight, grad_bias, grad_gamma, grad_beta written");
}
