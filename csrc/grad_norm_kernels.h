// Per-sample squared Frobenius norms of Conv2d weight gradients on CPU.
//
// For sample b and group k the weight gradient is G U^T, with G = dL/dz [p, T] and U the unfolded
// (im2col) input [D, T]. Each (b, k) pair unfolds its input into a buffer of its own and keeps only
// a squared sum: memory O(threads * (D + p) * T), never O(B * p * D). Direct form: |G U^T|^2 with
// one GEMM. Ghost form: <U^T U, G^T G>, two T x T GEMMs, cheaper when T (D + p) < D p.
//
// Included by grad_norm.cpp once per ISA level (isa.h), each time inside a namespace of its own: every header
// it needs is included there, none here.

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
                            int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t groups, bool ghost,
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
      at::Tensor w = ghost ? at::empty({t, t}, a.options()) : at::empty({p, d}, a.options());
      at::Tensor gram = ghost ? at::empty({t, t}, a.options()) : at::Tensor();
      for (int64_t n = begin; n < end; ++n) {
        const int64_t b = n / groups, k = n % groups;
        unfold_one(a_ptr + (b * groups + k) * cin * height * width, cols.data_ptr<scalar_t>(), cin, height,
                   width, kh, kw, sh, sw, dh, dw, out_h, out_w);
        at::Tensor gk = g[b].view({groups, p, t})[k];
        if (ghost) {
          at::mm_out(w, cols.t(), cols);
          at::mm_out(gram, gk.t(), gk);
          out_ptr[n] = at::dot(w.view(-1), gram.view(-1)).item<scalar_t>();
        } else {
          at::mm_out(w, gk, cols.t());
          at::Tensor flat = w.view(-1);
          out_ptr[n] = at::dot(flat, flat).item<scalar_t>();
        }
      }
    });
  });
}

// (sum a, sum a^2, sum a*g, sum g) of one row of length n, accumulated in double so that
// var = E[a^2] - E[a]^2 keeps its precision.
template <typename scalar_t>
void row_sums_one(const scalar_t* a, const scalar_t* g, int64_t n, double* out) {
  double sa = 0, saa = 0, sag = 0, sg = 0;
#pragma omp simd reduction(+ : sa, saa, sag, sg)
  for (int64_t s = 0; s < n; ++s) {
    const double x = a[s], y = g[s];
    sa += x;
    saa += x * x;
    sag += x * y;
    sg += y;
  }
  out[0] = sa;
  out[1] = saa;
  out[2] = sag;
  out[3] = sg;
}

// a, g: [R, S]; out: [R, 4] double, one read of each input.
void row_sums(const at::Tensor& a, const at::Tensor& g, at::Tensor& out) {
  TORCH_CHECK(a.is_contiguous() && g.is_contiguous() && out.is_contiguous(), "contiguous tensors expected");
  const int64_t rows = a.size(0), length = a.size(1);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "row_sums", [&] {
    const scalar_t* a_ptr = a.data_ptr<scalar_t>();
    const scalar_t* g_ptr = g.data_ptr<scalar_t>();
    double* out_ptr = out.data_ptr<double>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row_sums_one(a_ptr + r * length, g_ptr + r * length, length, out_ptr + 4 * r);
    });
  });
}
