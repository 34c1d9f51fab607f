// instance_norm_relu_pool on CPU: the tail of a ConvNet block, GroupNorm(C, C) + ReLU + AvgPool2d(2), reading
// each (sample, channel) plane once forward and once backward, never writing the normalised or rectified map.
//
// Per plane x [H, W] (L = H * W), with per-channel gamma, beta:
//   forward:  mean, rstd = 1 / sqrt(var + eps) (biased variance, two passes over the plane while it is in cache);
//             z = a x + b with a = rstd gamma, b = beta - mean a; y = max(z, 0);
//             out[i, j] = (y[2i, 2j] + y[2i, 2j+1] + y[2i+1, 2j] + y[2i+1, 2j+1]) / 4 (rows and columns past
//             2 * (H // 2), 2 * (W // 2) are dropped, as AvgPool2d does).
//   backward: gz = [z > 0] * grad_out[h / 2, w / 2] / 4 (0 on dropped rows and columns); xhat = (x - mean) rstd;
//             s1 = sum gz, s2 = sum gz xhat; grad_x = rstd gamma (gz - s1 / L - xhat s2 / L);
//             per plane s2 and s1 are the contributions to grad_gamma and grad_beta (summed over samples by torch).
// Accumulation in float for float32 and bfloat16, in double for float64 (at::opmath_type).
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// Planes per parallel task: about 16 KiB of input each or more.
int64_t grain(int64_t plane) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, plane)); }

// dst[k] = src[k] rounded to scalar_t. For bfloat16 the rounding (to nearest even, NaN kept) is spelt out on the
// bits, so that the loop vectorises; c10's scalar conversion does not.
template <typename scalar_t, typename acc>
void store(const acc* src, scalar_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(src[k]);
}

template <>
void store<at::BFloat16, float>(const float* src, at::BFloat16* dst, int64_t n) {
  auto* bits = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    uint32_t u;
    std::memcpy(&u, src + k, sizeof(u));
    const auto rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    bits[k] = src[k] != src[k] ? uint16_t(0x7FC0) : rounded;
  }
}

// dst[k] = src[k] widened to acc; for bfloat16 spelt out on the bits (the upper half of a float), so that it vectorises.
template <typename scalar_t, typename acc>
void load(const scalar_t* src, acc* dst, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<acc>(src[k]);
}

template <>
void load<at::BFloat16, float>(const at::BFloat16* src, float* dst, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t u = static_cast<uint32_t>(bits[k]) << 16;
    std::memcpy(dst + k, &u, sizeof(u));
  }
}

template <typename scalar_t>
void plane_stats(const scalar_t* x, int64_t l, double eps, acc_t<scalar_t>& mean, acc_t<scalar_t>& rstd) {
  using acc = acc_t<scalar_t>;
  acc sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < l; ++k) sum += static_cast<acc>(x[k]);
  mean = sum / l;
  acc sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t k = 0; k < l; ++k) {
    const acc d = static_cast<acc>(x[k]) - mean;
    sq += d * d;
  }
  rstd = acc(1) / std::sqrt(sq / l + static_cast<acc>(eps));
}

template <typename scalar_t>
void forward_impl(const scalar_t* x, const acc_t<scalar_t>* gamma, const acc_t<scalar_t>* beta, double eps,
                  scalar_t* out, acc_t<scalar_t>* mean, acc_t<scalar_t>* rstd, int64_t planes, int64_t c, int64_t h,
                  int64_t w) {
  using acc = acc_t<scalar_t>;
  const int64_t l = h * w, ho = h / 2, wo = w / 2;
  at::parallel_for(0, planes, grain(l), [&](int64_t begin, int64_t end) {
    std::vector<acc> row(2 * wo);  // the two rectified input rows of one output row, summed
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* xp = x + p * l;
      plane_stats(xp, l, eps, mean[p], rstd[p]);
      const acc a = rstd[p] * gamma[p % c], b = beta[p % c] - mean[p] * a;
      scalar_t* op = out + p * ho * wo;
      for (int64_t i = 0; i < ho; ++i) {
        const scalar_t *r0 = xp + 2 * i * w, *r1 = r0 + w;
#pragma omp simd
        for (int64_t k = 0; k < 2 * wo; ++k) {
          const acc z0 = a * static_cast<acc>(r0[k]) + b, z1 = a * static_cast<acc>(r1[k]) + b;
          row[k] = (z0 > 0 ? z0 : acc(0)) + (z1 > 0 ? z1 : acc(0));
        }
        for (int64_t j = 0; j < wo; ++j) op[i * wo + j] = static_cast<scalar_t>(acc(0.25) * (row[2 * j] + row[2 * j + 1]));
      }
    }
  });
}

// Two vectorised passes over each plane: the first sums s1 = sum gz and s2 = sum gz xhat, the second writes
// grad_x. gz is recomputed in both from the mask z > 0 and up, grad_out / 4 widened to the plane (0 on dropped
// rows and columns). For bfloat16 the plane is widened to float first and grad_x rounded at the end.
template <typename scalar_t>
void backward_impl(const scalar_t* grad_out, const scalar_t* x, const acc_t<scalar_t>* gamma,
                   const acc_t<scalar_t>* beta, const acc_t<scalar_t>* mean, const acc_t<scalar_t>* rstd,
                   scalar_t* grad_x, acc_t<scalar_t>* grad_gamma, acc_t<scalar_t>* grad_beta, int64_t planes,
                   int64_t c, int64_t h, int64_t w) {
  using acc = acc_t<scalar_t>;
  constexpr bool widened = !std::is_same_v<scalar_t, acc>;
  const int64_t l = h * w, ho = h / 2, wo = w / 2;
  at::parallel_for(0, planes, grain(l), [&](int64_t begin, int64_t end) {
    std::vector<acc> up(l, acc(0)), go(ho * wo), xs(widened ? l : 0), gxs(widened ? l : 0);
    for (int64_t p = begin; p < end; ++p) {
      load(grad_out + p * ho * wo, go.data(), ho * wo);
      for (int64_t i = 0; i < ho; ++i) {
        acc *u0 = up.data() + 2 * i * w, *u1 = u0 + w;
        for (int64_t j = 0; j < wo; ++j) u0[2 * j] = u0[2 * j + 1] = u1[2 * j] = u1[2 * j + 1] = acc(0.25) * go[i * wo + j];
      }
      const acc* xp;
      if constexpr (widened) {
        load(x + p * l, xs.data(), l);
        xp = xs.data();
      } else {
        xp = x + p * l;
      }
      const acc* u = up.data();
      const acc mu = mean[p], rs = rstd[p], a = rs * gamma[p % c], b = beta[p % c] - mu * a;
      acc s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t k = 0; k < l; ++k) {
        const acc v = a * xp[k] + b > 0 ? u[k] : acc(0);
        s1 += v;
        s2 += v * (xp[k] - mu);
      }
      s2 *= rs;
      grad_gamma[p] = s2, grad_beta[p] = s1;
      const acc m1 = s1 / l, m2r = s2 / l * rs;
      acc* gx = widened ? gxs.data() : reinterpret_cast<acc*>(grad_x + p * l);
#pragma omp simd
      for (int64_t k = 0; k < l; ++k) {
        const acc v = a * xp[k] + b > 0 ? u[k] : acc(0);
        gx[k] = a * (v - m1 - (xp[k] - mu) * m2r);
      }
      if constexpr (widened) store(gx, grad_x + p * l, l);
    }
  });
}

void check(const at::Tensor& t, const char* name, int64_t dim, at::ScalarType dtype) {
  TORCH_CHECK(t.is_contiguous() && t.dim() == dim, name, ": contiguous ", dim, "-D tensor expected");
  TORCH_CHECK(t.scalar_type() == dtype, name, ": dtype ", dtype, " expected, got ", t.scalar_type());
}

at::ScalarType opmath(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// x [N, C, H, W]; gamma, beta [C] and the outputs mean, rstd [N, C] in the accumulation dtype; out [N, C, H/2, W/2].
void forward(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, double eps, at::Tensor& out,
             at::Tensor& mean, at::Tensor& rstd) {
  const auto acc = opmath(x.scalar_type());
  check(x, "x", 4, x.scalar_type()), check(out, "out", 4, x.scalar_type());
  check(gamma, "gamma", 1, acc), check(beta, "beta", 1, acc), check(mean, "mean", 2, acc), check(rstd, "rstd", 2, acc);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "forward", [&] {
    using acc_scalar = acc_t<scalar_t>;
    forward_impl(x.data_ptr<scalar_t>(), gamma.data_ptr<acc_scalar>(), beta.data_ptr<acc_scalar>(), eps,
                 out.data_ptr<scalar_t>(), mean.data_ptr<acc_scalar>(), rstd.data_ptr<acc_scalar>(), n * c, c, h, w);
  });
}

// grad_out [N, C, H/2, W/2] and what forward read and wrote; writes grad_x [N, C, H, W] and the per-plane
// contributions grad_gamma, grad_beta [N, C] (accumulation dtype).
void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
              const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_gamma,
              at::Tensor& grad_beta) {
  const auto acc = opmath(x.scalar_type());
  check(grad_out, "grad_out", 4, x.scalar_type()), check(x, "x", 4, x.scalar_type());
  check(grad_x, "grad_x", 4, x.scalar_type());
  check(gamma, "gamma", 1, acc), check(beta, "beta", 1, acc), check(mean, "mean", 2, acc), check(rstd, "rstd", 2, acc);
  check(grad_gamma, "grad_gamma", 2, acc), check(grad_beta, "grad_beta", 2, acc);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "backward", [&] {
    using acc_scalar = acc_t<scalar_t>;
    backward_impl(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gamma.data_ptr<acc_scalar>(),
                  beta.data_ptr<acc_scalar>(), mean.data_ptr<acc_scalar>(), rstd.data_ptr<acc_scalar>(),
                  grad_x.data_ptr<scalar_t>(), grad_gamma.data_ptr<acc_scalar>(), grad_beta.data_ptr<acc_scalar>(),
                  n * c, c, h, w);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "out [N, C, H/2, W/2], mean and rstd [N, C] written from x [N, C, H, W]");
  m.def("backward", &backward, "grad_x [N, C, H, W] and per-plane grad_gamma, grad_beta [N, C] written");
}
