// Gradient-matching distance on CPU, over many layers in one call, reading the layers where they lie
// (no concatenation).
//
// The work is a table of chunks [chunks, 4] = (layer, start, length, row): `length` contiguous
// elements of layer `layer` from element `start`, belonging to output row `row` (-1: the chunk adds
// nothing to the distance and its gradient is zero). `work` [chunks + 1] is the prefix sum of the
// chunks' costs; threads split that sum evenly, so a few long rows do not land on one thread.
//
// row_sums writes each chunk's partial sums and, when given unit-gradient outputs, the gradient of
// the distance for an upstream gradient of 1 in the same pass (the chunk is still in cache): for
// squared / absolute differences elementwise, for dot/norms from the chunk's own sums, which the
// caller guarantees are whole rows. input_grads writes the gradients from per-row coefficients
// (for rows that span many chunks: "cos").
//
// Included by grad_match.cpp once per ISA level (isa.h), each time inside a namespace of its own: every header
// it needs is included there, none here.

enum Kind : int64_t { kDotNorms = 0, kSquaredDiff = 1, kAbsDiff = 2 };
constexpr double kEps = 1e-6;

// Large outputs are fresh, untouched pages: ask for transparent huge pages before the first write,
// which cuts the cost of faulting them in several times over (the OS may ignore the advice).
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

template <typename T>
std::vector<T*> pointers(const std::vector<at::Tensor>& tensors, bool output = false) {
  std::vector<T*> out;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.is_contiguous(), "grad_match: contiguous tensors expected");
    if (output) advise_huge_pages(t);
    out.push_back(t.data_ptr<T>());
  }
  return out;
}

// Calls fn(c) for every chunk c, the chunks split between threads by their cost in `work`.
template <typename Fn>
void for_each_chunk(const at::Tensor& work, Fn fn) {
  const int64_t* w = work.data_ptr<int64_t>();
  const int64_t chunks = work.numel() - 1;
  at::parallel_for(0, w[chunks], 1 << 15, [&](int64_t begin, int64_t end) {
    // the chunks whose cost starts inside [begin, end)
    const int64_t first = std::lower_bound(w, w + chunks, begin) - w;
    const int64_t last = std::lower_bound(w, w + chunks, end) - w;
    for (int64_t c = first; c < last; ++c) fn(c);
  });
}

// gx = alpha_a x + beta_a y and gy = alpha_b y + beta_b x; a null output is not written.
template <typename T>
void write_linear(const T* x, const T* y, int64_t n, T alpha_a, T beta_a, T alpha_b, T beta_b, T* gx, T* gy) {
  if (gx) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gx[i] = alpha_a * x[i] + beta_a * y[i];
  }
  if (gy) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gy[i] = alpha_b * y[i] + beta_b * x[i];
  }
}

// gx = sign(x - y) (0 at ties, as torch's abs) and gy = -gx; a null output is not written.
template <typename T>
void write_sign(const T* x, const T* y, int64_t n, T* gx, T* gy) {
  if (gx) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gx[i] = T((x[i] > y[i]) - (x[i] < y[i]));
  }
  if (gy) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gy[i] = T((y[i] > x[i]) - (y[i] < x[i]));
  }
}

template <typename T>
void zero(T* g, int64_t n) {
  if (g) std::fill(g, g + n, T(0));
}

// out [chunks, width]: per chunk (<a,b>, |a|^2, |b|^2) for kDotNorms, else sum (a-b)^2 or sum |a-b|;
// unit_a / unit_b (empty: not written): the distance's gradient for an upstream gradient of 1.
template <typename scalar_t>
void row_sums_impl(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, const at::Tensor& table,
                   const at::Tensor& work, int64_t kind, at::Tensor& out, const std::vector<at::Tensor>& unit_a,
                   const std::vector<at::Tensor>& unit_b) {
  using acc_t = scalar_t;  // float for float32 (chunks are short), double for float64
  const auto pa = pointers<scalar_t>(a), pb = pointers<scalar_t>(b);
  const auto ua = pointers<scalar_t>(unit_a, true), ub = pointers<scalar_t>(unit_b, true);
  const int64_t* tab = table.data_ptr<int64_t>();
  const int64_t width = out.size(1);
  scalar_t* o = out.data_ptr<scalar_t>();
  for_each_chunk(work, [&](int64_t c) {
    const int64_t layer = tab[4 * c], start = tab[4 * c + 1], n = tab[4 * c + 2], row = tab[4 * c + 3];
    const scalar_t* x = pa[layer] + start;
    const scalar_t* y = pb[layer] + start;
    scalar_t* gx = ua.empty() ? nullptr : ua[layer] + start;
    scalar_t* gy = ub.empty() ? nullptr : ub[layer] + start;
    if (row < 0) {
      std::fill(o + width * c, o + width * (c + 1), scalar_t(0));
      zero(gx, n);
      zero(gy, n);
      return;
    }
    acc_t s0 = 0, s1 = 0, s2 = 0;
    if (kind == kDotNorms) {
#pragma omp simd reduction(+ : s0, s1, s2)
      for (int64_t i = 0; i < n; ++i) {
        const acc_t xi = x[i], yi = y[i];
        s0 += xi * yi;
        s1 += xi * xi;
        s2 += yi * yi;
      }
      o[width * c] = s0;
      o[width * c + 1] = s1;
      o[width * c + 2] = s2;
      if (gx || gy) {  // d/da [1 - <a,b> / D] = -b / D + <a,b> |b| a / (|a| D^2), D = |a||b| + eps
        const acc_t na = std::sqrt(s1), nb = std::sqrt(s2), d = na * nb + acc_t(kEps);
        const acc_t scale = s0 / (d * d), beta = -1 / d;
        write_linear<scalar_t>(x, y, n, na > 0 ? scale * nb / na : 0, beta, nb > 0 ? scale * na / nb : 0, beta,
                               gx, gy);
      }
      return;
    }
    const bool squared = kind == kSquaredDiff;
#pragma omp simd reduction(+ : s0)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t d = acc_t(x[i]) - acc_t(y[i]);
      s0 += squared ? d * d : std::abs(d);
    }
    o[width * c] = s0;
    if (squared)
      write_linear<scalar_t>(x, y, n, 2, -2, 2, -2, gx, gy);
    else
      write_sign<scalar_t>(x, y, n, gx, gy);
  });
}

// grad_a = alpha_a a + beta_a b and grad_b = alpha_b b + beta_b a with coef [rows, 4] =
// (alpha_a, beta_a, alpha_b, beta_b) per row.
template <typename scalar_t>
void input_grads_impl(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, const at::Tensor& table,
                      const at::Tensor& work, const at::Tensor& coef, const std::vector<at::Tensor>& grad_a,
                      const std::vector<at::Tensor>& grad_b) {
  const auto pa = pointers<scalar_t>(a), pb = pointers<scalar_t>(b);
  const auto ga = pointers<scalar_t>(grad_a, true), gb = pointers<scalar_t>(grad_b, true);
  const int64_t* tab = table.data_ptr<int64_t>();
  const scalar_t* k = coef.data_ptr<scalar_t>();
  for_each_chunk(work, [&](int64_t c) {
    const int64_t layer = tab[4 * c], start = tab[4 * c + 1], n = tab[4 * c + 2], row = tab[4 * c + 3];
    const scalar_t* x = pa[layer] + start;
    const scalar_t* y = pb[layer] + start;
    scalar_t* gx = ga.empty() ? nullptr : ga[layer] + start;
    scalar_t* gy = gb.empty() ? nullptr : gb[layer] + start;
    if (row < 0) {
      zero(gx, n);
      zero(gy, n);
    } else {
      write_linear<scalar_t>(x, y, n, k[4 * row], k[4 * row + 1], k[4 * row + 2], k[4 * row + 3], gx, gy);
    }
  });
}

void row_sums(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, const at::Tensor& table,
              const at::Tensor& work, int64_t kind, at::Tensor& out, const std::vector<at::Tensor>& unit_a,
              const std::vector<at::Tensor>& unit_b) {
  TORCH_CHECK(out.is_contiguous() && table.is_contiguous() && work.is_contiguous(), "contiguous tensors expected");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "grad_match_row_sums",
                             [&] { row_sums_impl<scalar_t>(a, b, table, work, kind, out, unit_a, unit_b); });
}

void input_grads(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, const at::Tensor& table,
                 const at::Tensor& work, const at::Tensor& coef, const std::vector<at::Tensor>& grad_a,
                 const std::vector<at::Tensor>& grad_b) {
  TORCH_CHECK(coef.is_contiguous() && table.is_contiguous() && work.is_contiguous(), "contiguous tensors expected");
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "grad_match_input_grads",
                             [&] { input_grads_impl<scalar_t>(a, b, table, work, coef, grad_a, grad_b); });
}
