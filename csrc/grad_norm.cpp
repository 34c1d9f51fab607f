// The C++ extension of per-sample squared norms of weight gradients: the kernels of grad_norm_kernels.h, compiled
// once per ISA level (isa.h), and their bindings.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#define FASTDD_KERNELS "grad_norm_kernels.h"
#include "isa.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_levels(m);
  m.def("conv2d_weight_sq_norms", FASTDD_BY_LEVEL(conv2d_weight_sq_norms),
        "per-sample squared norms of Conv2d weight gradients (direct or ghost form), written to out [B * groups]");
  m.def("row_sums", FASTDD_BY_LEVEL(row_sums),
        "per-row (sum a, sum a^2, sum a*g, sum g) of a, g [R, S], written to out [R, 4] (double)");
}
