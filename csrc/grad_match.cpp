// The C++ extension of the gradient-matching distance: the kernels of grad_match_kernels.h, compiled once per ISA
// level (isa.h), and their bindings.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#define FASTDD_KERNELS "grad_match_kernels.h"
#include "isa.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_levels(m);
  m.def("row_sums", FASTDD_BY_LEVEL(row_sums),
        "per-chunk partial sums to out [chunks, width], and (when given) the unit-upstream gradients");
  m.def("input_grads", FASTDD_BY_LEVEL(input_grads),
        "gradients w.r.t. both lists from per-row coefficients, to grad_a / grad_b");
}
