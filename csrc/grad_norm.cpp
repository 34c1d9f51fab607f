// Per-sample squared Frobenius norms of Conv2d weight gradients, direct form, on CPU.
//
// For sample b and group k the weight gradient is G U^T, with G = dL/dz [p, T] and U the unfolded
// (im2col) input [D, T]. Each (b, k) pair unfolds its input into a buffer of its own, multiplies
// with torch's GEMM and keeps only the squared sum: memory O(threads * D * T), never O(B * p * D).
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

template <typename scalar_t>
void unfold_one(const scalar_t* a, scalar_t* cols, int64_t channels, int64_t height, int64_t width,
                int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                int64_t out_h, int64_t out_w) {
  // cols[d, t] with d = (c, i, j) and t = (y, x), the order of torch's unfold.
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j) {
        scalar_t* row = cols + ((c * kh + i) * kw + j) * out_h * out_w;
        for (int64_t y = 0; y < out_h; ++y) {
          const scalar_t* src = a + (c * height + y * sh + i * dh) * width + j * dw;
          scalar_t* dst = row + y * out_w;
          for (int64_t x = 0; x < out_w; ++x) dst[x] = src[x * sw];
        }
      }
}

// a: padded input [B, Cin, H, W]; g: output gradient [B, Cout, Ho, Wo]; out: [B * groups].
void conv2d_weight_sq_norms(const at::Tensor& a, const at::Tensor& g, int64_t kh, int64_t kw,
                            int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t groups,
                            at::Tensor& out) {
  TORCH_CHECK(a.is_contiguous() && g.is_contiguous() && out.is_contiguous(), "contiguous tensors expected");
  const int64_t batch = a.size(0), cin = a.size(1) / groups, height = a.size(2), width = a.size(3);
  const int64_t p = g.size(1) / groups, out_h = g.size(2), out_w = g.size(3);
  const int64_t d = cin * kh * kw, t = out_h * out_w;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "conv2d_weight_sq_norms", [&] {
    const scalar_t* a_ptr = a.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
      at::Tensor cols = at::empty({d, t}, a.options());
      at::Tensor w = at::empty({p, d}, a.options());
      for (int64_t n = begin; n < end; ++n) {
        const int64_t b = n / groups, k = n % groups;
        unfold_one(a_ptr + (b * groups + k) * cin * height * width, cols.data_ptr<scalar_t>(), cin, height,
                   width, kh, kw, sh, sw, dh, dw, out_h, out_w);
        at::Tensor gk = g[b].view({groups, p, t})[k];
        at::mm_out(w, gk, cols.t());
        at::Tensor flat = w.view(-1);
        out_ptr[n] = at::dot(flat, flat).item<scalar_t>();
      }
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv2d_weight_sq_norms", &conv2d_weight_sq_norms,
        "per-sample squared norms of Conv2d weight gradients (direct form), written to out [B * groups]");
}
