// instance_norm_relu_pool on CPU: the tail of a ConvNet block, GroupNorm(C, C) + ReLU + AvgPool2d(2), reading
// each (sample, channel) plane once forward and once backward, never writing the normalised or rectified map.
//
// Per plane x [H, W] (L = H * W), with per-channel gamma, beta:
//   forward:  mean, rstd = 1 / sqrt(var + eps) (biased variance, two passes over the plane while it is in cache);
//             z = a x + b with a = rstd gamma, b = beta - mean a; y = relu(z) (NaN kept, as torch.relu);
//             out[i, j] = (y[2i, 2j] + y[2i, 2j+1] + y[2i+1, 2j] + y[2i+1, 2j+1]) / 4 (rows and columns past
//             2 * (H // 2), 2 * (W // 2) are dropped, as AvgPool2d does).
//   backward: gz = [not z <= 0] * grad_out[h / 2, w / 2] / 4 (0 on dropped rows and columns; a NaN z passes, as
//             torch's threshold_backward); xhat = (x - mean) rstd; s1 = sum gz, s2 = sum gz xhat;
//             grad_x = rstd gamma (gz - s1 / L - xhat s2 / L), computed as ATen's GroupNorm backward does
//             (plane_backward); per plane s2 and s1 are the contributions to grad_gamma and grad_beta (summed
//             over samples by torch).
// Accumulation in float for float32 and bfloat16, in double for float64 (at::opmath_type).
//
// Included by norm_relu_pool.cpp once per ISA level (isa.h), each time inside a namespace of its own: every header
// it needs is included there, none here.

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

// ReLU as torch.relu: NaN stays NaN (a single max instruction; max(z, 0) written z > 0 ? z : 0 would drop it).
template <typename acc>
acc relu(acc z) { return z < 0 ? acc(0) : z; }

// Whether ReLU's backward passes the gradient at z, as torch's threshold_backward: everywhere but z <= 0 (NaN
// included, so that a NaN plane's gradient is NaN, not 0).
template <typename acc>
bool relu_passes(acc z) { return !(z <= 0); }

template <typename in_t, typename acc>
void plane_stats(const in_t* x, int64_t l, double eps, acc& mean, acc& rstd) {
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

// One plane x [h, w] forward: its mean and rstd, and out [h / 2, w / 2], whose value q lies at out[q * stride] (1,
// or C for a channels_last output). row: scratch of 2 * (w / 2).
template <typename in_t, typename out_t, typename acc>
void plane_forward(const in_t* x, int64_t h, int64_t w, acc gamma, acc beta, double eps, out_t* out, acc& mean,
                   acc& rstd, acc* row, int64_t stride = 1) {
  const int64_t ho = h / 2, wo = w / 2;
  plane_stats(x, h * w, eps, mean, rstd);
  const acc a = rstd * gamma, b = beta - mean * a;
  for (int64_t i = 0; i < ho; ++i) {
    const in_t *r0 = x + 2 * i * w, *r1 = r0 + w;
#pragma omp simd
    for (int64_t k = 0; k < 2 * wo; ++k) {
      const acc z0 = a * static_cast<acc>(r0[k]) + b, z1 = a * static_cast<acc>(r1[k]) + b;
      row[k] = relu(z0) + relu(z1);
    }
    for (int64_t j = 0; j < wo; ++j)
      out[(i * wo + j) * stride] = static_cast<out_t>(acc(0.25) * (row[2 * j] + row[2 * j + 1]));
  }
}

// up [h, w] = grad_out [h / 2, w / 2] / 4, each element on its 2 x 2 window; up's dropped rows and columns are
// never written (the caller zeroes them once).
template <typename acc>
void widen(const acc* grad_out, int64_t h, int64_t w, acc* up) {
  const int64_t ho = h / 2, wo = w / 2;
  for (int64_t i = 0; i < ho; ++i) {
    acc *u0 = up + 2 * i * w, *u1 = u0 + w;
    for (int64_t j = 0; j < wo; ++j) u0[2 * j] = u0[2 * j + 1] = u1[2 * j] = u1[2 * j + 1] = acc(0.25) * grad_out[i * wo + j];
  }
}

// From a plane's sums db = sum gz and ds = sum gz x (plane_backward): its contribution s2 to grad_gamma and the
// coefficients c2, c3 of its input gradient.
template <typename acc>
struct NormBackward {
  acc s2, c2, c3;
  NormBackward(acc db, acc ds, acc gamma, acc mean, acc rstd, int64_t l) {
    const acc db_gamma = db * gamma, ds_gamma = ds * gamma;
    s2 = (ds - db * mean) * rstd;
    c2 = (db_gamma * mean - ds_gamma) * rstd * rstd * rstd / l;
    c3 = -c2 * mean - db_gamma * rstd / l;
  }
};

// One plane x [l] backward, in two vectorised passes, in ATen's GroupNorm backward formulation (so that
// infinities meet as they do there: an infinite gamma gives NaN where ATen's does). The first pass sums
// db = sum gz and ds = sum gz x; s1 = db and s2 = (ds - db mean) rstd are the plane's contributions to grad_beta
// and grad_gamma. The second writes gx = c1 gz + c2 x + c3 with c1 = rstd gamma,
// c2 = (db gamma mean - ds gamma) rstd^3 / l, c3 = -c2 mean - db gamma rstd / l. gz = [not z <= 0] up is
// recomputed in both.
template <typename acc>
void plane_backward(const acc* x, const acc* up, int64_t l, acc gamma, acc beta, acc mean, acc rstd, acc* gx,
                    acc& s1, acc& s2) {
  const acc a = rstd * gamma, b = beta - mean * a;
  acc db = 0, ds = 0;
#pragma omp simd reduction(+ : db, ds)
  for (int64_t k = 0; k < l; ++k) {
    const acc v = relu_passes(a * x[k] + b) ? up[k] : acc(0);
    db += v;
    ds += v * x[k];
  }
  const NormBackward<acc> nb(db, ds, gamma, mean, rstd, l);
  s1 = db, s2 = nb.s2;
  const acc c2 = nb.c2, c3 = nb.c3;
#pragma omp simd
  for (int64_t k = 0; k < l; ++k) {
    const acc v = relu_passes(a * x[k] + b) ? up[k] : acc(0);
    gx[k] = a * v + c2 * x[k] + c3;
  }
}

template <typename scalar_t>
void forward_impl(const scalar_t* x, const acc_t<scalar_t>* gamma, const acc_t<scalar_t>* beta, double eps,
                  scalar_t* out, acc_t<scalar_t>* mean, acc_t<scalar_t>* rstd, int64_t planes, int64_t c, int64_t h,
                  int64_t w) {
  using acc = acc_t<scalar_t>;
  const int64_t l = h * w, lo = (h / 2) * (w / 2);
  at::parallel_for(0, planes, grain(l), [&](int64_t begin, int64_t end) {
    std::vector<acc> row(w);
    for (int64_t p = begin; p < end; ++p)
      plane_forward(x + p * l, h, w, gamma[p % c], beta[p % c], eps, out + p * lo, mean[p], rstd[p], row.data());
  });
}

// For bfloat16 each plane is widened to float first and grad_x rounded at the end.
template <typename scalar_t>
void backward_impl(const scalar_t* grad_out, const scalar_t* x, const acc_t<scalar_t>* gamma,
                   const acc_t<scalar_t>* beta, const acc_t<scalar_t>* mean, const acc_t<scalar_t>* rstd,
                   scalar_t* grad_x, acc_t<scalar_t>* grad_gamma, acc_t<scalar_t>* grad_beta, int64_t planes,
                   int64_t c, int64_t h, int64_t w) {
  using acc = acc_t<scalar_t>;
  constexpr bool widened = !std::is_same_v<scalar_t, acc>;
  const int64_t l = h * w, lo = (h / 2) * (w / 2);
  at::parallel_for(0, planes, grain(l), [&](int64_t begin, int64_t end) {
    std::vector<acc> up(l, acc(0)), go(lo), xs(widened ? l : 0), gxs(widened ? l : 0);
    for (int64_t p = begin; p < end; ++p) {
      load(grad_out + p * lo, go.data(), lo);
      widen(go.data(), h, w, up.data());
      if constexpr (widened) {
        load(x + p * l, xs.data(), l);
        plane_backward(xs.data(), up.data(), l, gamma[p % c], beta[p % c], mean[p], rstd[p], gxs.data(),
                       grad_beta[p], grad_gamma[p]);
        store(gxs.data(), grad_x + p * l, l);
      } else {
        plane_backward(x + p * l, up.data(), l, gamma[p % c], beta[p % c], mean[p], rstd[p], grad_x + p * l,
                       grad_beta[p], grad_gamma[p]);
      }
    }
  });
}

// The same op on channels_last tensors: x [N, H, W, C] in memory, out [N, H / 2, W / 2, C]. A task takes one sample
// and a block of up to kChannels channels, whose values at one position are contiguous: every loop walks the
// positions in order with the block's channels across the vector lanes, and the arithmetic per channel is that of
// plane_forward and plane_backward (sums taken position by position).
constexpr int64_t kChannels = 32;

struct Nhwc {
  int64_t n, c, h, w, ho, wo, blocks;
  Nhwc(int64_t n, int64_t c, int64_t h, int64_t w)
      : n(n), c(c), h(h), w(w), ho(h / 2), wo(w / 2), blocks((c + kChannels - 1) / kChannels) {}
  int64_t tasks() const { return n * blocks; }
  int64_t sample(int64_t task) const { return task / blocks; }
  int64_t first(int64_t task) const { return task % blocks * kChannels; }
  int64_t width(int64_t task) const { return std::min(kChannels, c - first(task)); }
};

template <typename scalar_t>
void forward_nhwc_impl(const scalar_t* x, const acc_t<scalar_t>* gamma, const acc_t<scalar_t>* beta, double eps,
                       scalar_t* out, acc_t<scalar_t>* mean, acc_t<scalar_t>* rstd, const Nhwc& s) {
  using acc = acc_t<scalar_t>;
  const int64_t l = s.h * s.w;
  at::parallel_for(0, s.tasks(), grain(l * kChannels), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = s.sample(t), c0 = s.first(t), cb = s.width(t);
      const scalar_t* xs = x + n * l * s.c + c0;
      acc sum[kChannels] = {}, sq[kChannels] = {}, a[kChannels], b[kChannels];
      for (int64_t q = 0; q < l; ++q)
#pragma omp simd
        for (int64_t k = 0; k < cb; ++k) sum[k] += static_cast<acc>(xs[q * s.c + k]);
      for (int64_t k = 0; k < cb; ++k) sum[k] /= l;  // the mean
      for (int64_t q = 0; q < l; ++q)
#pragma omp simd
        for (int64_t k = 0; k < cb; ++k) {
          const acc d = static_cast<acc>(xs[q * s.c + k]) - sum[k];
          sq[k] += d * d;
        }
      for (int64_t k = 0; k < cb; ++k) {
        const acc r = acc(1) / std::sqrt(sq[k] / l + static_cast<acc>(eps));
        mean[n * s.c + c0 + k] = sum[k], rstd[n * s.c + c0 + k] = r;
        a[k] = r * gamma[c0 + k], b[k] = beta[c0 + k] - sum[k] * a[k];
      }
      for (int64_t i = 0; i < s.ho; ++i)
        for (int64_t j = 0; j < s.wo; ++j) {
          const scalar_t* p00 = xs + (2 * i * s.w + 2 * j) * s.c;
          const scalar_t *p01 = p00 + s.c, *p10 = p00 + s.w * s.c, *p11 = p10 + s.c;
          scalar_t* o = out + ((n * s.ho + i) * s.wo + j) * s.c + c0;
#pragma omp simd
          for (int64_t k = 0; k < cb; ++k) {
            const acc left = relu(a[k] * static_cast<acc>(p00[k]) + b[k]) + relu(a[k] * static_cast<acc>(p10[k]) + b[k]);
            const acc right =
                relu(a[k] * static_cast<acc>(p01[k]) + b[k]) + relu(a[k] * static_cast<acc>(p11[k]) + b[k]);
            o[k] = static_cast<scalar_t>(acc(0.25) * (left + right));
          }
        }
    }
  });
}

template <typename scalar_t>
void backward_nhwc_impl(const scalar_t* grad_out, const scalar_t* x, const acc_t<scalar_t>* gamma,
                        const acc_t<scalar_t>* beta, const acc_t<scalar_t>* mean, const acc_t<scalar_t>* rstd,
                        scalar_t* grad_x, acc_t<scalar_t>* grad_gamma, acc_t<scalar_t>* grad_beta, const Nhwc& s) {
  using acc = acc_t<scalar_t>;
  const int64_t l = s.h * s.w;
  at::parallel_for(0, s.tasks(), grain(l * kChannels), [&](int64_t begin, int64_t end) {
    const acc zero[kChannels] = {};
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = s.sample(t), c0 = s.first(t), cb = s.width(t), row = n * s.c + c0;
      const scalar_t* xs = x + n * l * s.c + c0;
      scalar_t* gx = grad_x + n * l * s.c + c0;
      acc a[kChannels], b[kChannels], db[kChannels] = {}, ds[kChannels] = {}, c2[kChannels], c3[kChannels];
      acc up[kChannels];
      for (int64_t k = 0; k < cb; ++k) a[k] = rstd[row + k] * gamma[c0 + k], b[k] = beta[c0 + k] - mean[row + k] * a[k];
      // up = grad_out / 4 at position (y, x)'s window, 0 on the rows and columns pooling drops
      auto upstream = [&](int64_t y, int64_t q) -> const acc* {
        if (y >= 2 * s.ho || q >= 2 * s.wo) return zero;
        const scalar_t* g = grad_out + ((n * s.ho + y / 2) * s.wo + q / 2) * s.c + c0;
#pragma omp simd
        for (int64_t k = 0; k < cb; ++k) up[k] = acc(0.25) * static_cast<acc>(g[k]);
        return up;
      };
      for (int64_t y = 0; y < s.h; ++y)
        for (int64_t q = 0; q < s.w; ++q) {
          const acc* u = upstream(y, q);
          const scalar_t* xp = xs + (y * s.w + q) * s.c;
#pragma omp simd
          for (int64_t k = 0; k < cb; ++k) {
            const acc xv = static_cast<acc>(xp[k]);
            const acc v = relu_passes(a[k] * xv + b[k]) ? u[k] : acc(0);
            db[k] += v;
            ds[k] += v * xv;
          }
        }
      for (int64_t k = 0; k < cb; ++k) {
        const NormBackward<acc> nb(db[k], ds[k], gamma[c0 + k], mean[row + k], rstd[row + k], l);
        grad_beta[row + k] = db[k], grad_gamma[row + k] = nb.s2, c2[k] = nb.c2, c3[k] = nb.c3;
      }
      for (int64_t y = 0; y < s.h; ++y)
        for (int64_t q = 0; q < s.w; ++q) {
          const acc* u = upstream(y, q);
          const int64_t at = (y * s.w + q) * s.c;
#pragma omp simd
          for (int64_t k = 0; k < cb; ++k) {
            const acc xv = static_cast<acc>(xs[at + k]);
            const acc v = relu_passes(a[k] * xv + b[k]) ? u[k] : acc(0);
            gx[at + k] = static_cast<scalar_t>(a[k] * v + c2[k] * xv + c3[k]);
          }
        }
    }
  });
}

// The convolution of conv_instance_norm_relu_pool: stride 1, kernel [cin, kh, kw], zero padding pad; output plane
// [h, w] = [hp - kh + 1, wp - kw + 1] with hp, wp the padded input's sides. Each sample is first copied into a
// padded buffer (Sample). The plane is computed on the padded width, wide[y * wp + x] for x < wp, so that tap
// t = (ci, ky, kx) reads the buffer at q + offset(t) for every output q: flat, vectorisable loops. Columns x >= w
// wrap into the next row and are dropped; the buffer's zero tail keeps the reads of the last block inside it.
constexpr int64_t kBlock = 64;  // outputs summed in registers over every tap before one store

struct ConvShape {
  int64_t cin, hin, win, pad, kh, kw, hp, wp, h, w;
  ConvShape(int64_t cin, int64_t hin, int64_t win, int64_t pad, int64_t kh, int64_t kw)
      : cin(cin), hin(hin), win(win), pad(pad), kh(kh), kw(kw), hp(hin + 2 * pad), wp(win + 2 * pad),
        h(hp - kh + 1), w(wp - kw + 1) {}
  int64_t taps() const { return cin * kh * kw; }
  int64_t wide() const { return (h * wp + kBlock - 1) / kBlock * kBlock; }  // the wide plane, whole blocks
  int64_t buffer() const { return cin * hp * wp + kBlock + kw; }            // a padded sample and its tail
  // where tap t = (ci, ky, kx) starts reading in the padded sample
  std::vector<int64_t> offsets() const {
    std::vector<int64_t> o(taps());
    for (int64_t t = 0; t < taps(); ++t) o[t] = (t / (kh * kw)) * hp * wp + (t / kw % kh) * wp + t % kw;
    return o;
  }
};

// A per-task padded copy of one sample at a time: zero borders and tail written once, the interior per sample.
template <typename acc>
struct Sample {
  const ConvShape& s;
  std::vector<acc> buf;
  int64_t loaded = -1;
  explicit Sample(const ConvShape& s) : s(s), buf(s.buffer(), acc(0)) {}
  const acc* get(const acc* x, int64_t n) {
    if (n != loaded) {
      const acc* src = x + n * s.cin * s.hin * s.win;
      for (int64_t ci = 0; ci < s.cin; ++ci)
        for (int64_t y = 0; y < s.hin; ++y)
          std::memcpy(buf.data() + (ci * s.hp + y + s.pad) * s.wp + s.pad, src + (ci * s.hin + y) * s.win,
                      s.win * sizeof(acc));
      loaded = n;
    }
    return buf.data();
  }
};

// A vector of acc as wide as the level's registers (GCC/Clang vector extension, kVectorBytes from isa.h: at AVX-512
// 16 floats or 8 doubles), and unaligned moves. Wider than the registers, GCC splits every operation and passes the
// vectors through memory: the AVX2 copy of the fused first block took 5x the AVX-512 one's time with 64-byte
// vectors.
template <typename acc>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
};
template <typename acc>
using vec = typename Vec<acc>::type;

template <typename acc>
vec<acc> load_vec(const acc* p) {
  vec<acc> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// z [h * w] = bias + the convolution of padded sample x with one output channel's weight [taps];
// wide: scratch [s.wide()]. Each block of kBlock outputs is held in registers while every tap is added.
template <typename acc>
void conv_plane(const acc* x, const acc* weight, acc bias, const ConvShape& s, const int64_t* offsets, acc* wide,
                acc* z) {
  constexpr int64_t lanes = sizeof(vec<acc>) / sizeof(acc), vecs = kBlock / lanes;
  for (int64_t q0 = 0; q0 < s.wide(); q0 += kBlock) {
    vec<acc> v[vecs];
    for (int64_t u = 0; u < vecs; ++u) v[u] = vec<acc>{} + bias;
    for (int64_t t = 0; t < s.taps(); ++t) {
      const acc* src = x + offsets[t] + q0;
      const acc wt = weight[t];
      for (int64_t u = 0; u < vecs; ++u) v[u] += wt * load_vec(src + u * lanes);
    }
    std::memcpy(wide + q0, v, sizeof(v));
  }
  for (int64_t y = 0; y < s.h; ++y) std::memcpy(z + y * s.w, wide + y * s.wp, s.w * sizeof(acc));
}

// grad_weight [taps] = the correlation of gz [h * w] with padded sample x; gz_wide: scratch [s.wide()] whose
// columns x >= w and tail are zero (the caller zeroes it once).
template <typename acc>
void conv_weight_grad(const acc* x, const acc* gz, const ConvShape& s, const int64_t* offsets, acc* gz_wide,
                      acc* grad_weight) {
  constexpr int64_t lanes = sizeof(vec<acc>) / sizeof(acc), vecs = kBlock / lanes;
  for (int64_t y = 0; y < s.h; ++y) std::memcpy(gz_wide + y * s.wp, gz + y * s.w, s.w * sizeof(acc));
  for (int64_t t = 0; t < s.taps(); ++t) {
    const acc* src = x + offsets[t];
    vec<acc> dot[vecs] = {};
    for (int64_t q0 = 0; q0 < s.wide(); q0 += kBlock)
      for (int64_t u = 0; u < vecs; ++u) dot[u] += load_vec(gz_wide + q0 + u * lanes) * load_vec(src + q0 + u * lanes);
    for (int64_t u = 1; u < vecs; ++u) dot[0] += dot[u];
    acc sum = 0;
    for (int64_t k = 0; k < lanes; ++k) sum += dot[0][k];
    grad_weight[t] = sum;
  }
}

// Where plane p = (sample, channel) of an [N, C, h / 2, w / 2] output starts, and the step between its values:
// contiguous, or channels_last (nhwc).
struct OutPlanes {
  int64_t c, lo;
  bool nhwc;
  int64_t start(int64_t p) const { return nhwc ? p / c * lo * c + p % c : p * lo; }
  int64_t stride() const { return nhwc ? c : 1; }
};

template <typename acc>
void conv_forward_impl(const acc* x, const acc* weight, const acc* bias, const acc* gamma, const acc* beta, double eps,
                       acc* out, acc* mean, acc* rstd, int64_t batch, int64_t c, const ConvShape& s, bool nhwc) {
  const int64_t l = s.h * s.w;
  const OutPlanes planes{c, (s.h / 2) * (s.w / 2), nhwc};
  const auto offsets = s.offsets();
  at::parallel_for(0, batch * c, grain(l), [&](int64_t begin, int64_t end) {
    Sample<acc> sample(s);
    std::vector<acc> wide(s.wide()), z(l), row(s.w);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t o = p % c;
      conv_plane(sample.get(x, p / c), weight + o * s.taps(), bias[o], s, offsets.data(), wide.data(), z.data());
      plane_forward(z.data(), s.h, s.w, gamma[o], beta[o], eps, out + planes.start(p), mean[p], rstd[p], row.data(),
                    planes.stride());
    }
  });
}

template <typename acc>
void conv_backward_impl(const acc* grad_out, const acc* x, const acc* weight, const acc* bias, const acc* gamma,
                        const acc* beta, const acc* mean, const acc* rstd, acc* grad_weight, acc* grad_bias,
                        acc* grad_gamma, acc* grad_beta, int64_t batch, int64_t c, const ConvShape& s, bool nhwc) {
  const int64_t l = s.h * s.w;
  const OutPlanes planes{c, (s.h / 2) * (s.w / 2), nhwc};
  const auto offsets = s.offsets();
  at::parallel_for(0, batch * c, grain(l), [&](int64_t begin, int64_t end) {
    Sample<acc> sample(s);
    std::vector<acc> wide(s.wide()), gz_wide(s.wide(), acc(0)), z(l), up(l, acc(0)), gz(l), go(nhwc ? planes.lo : 0);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t o = p % c;
      const acc* xs = sample.get(x, p / c);
      conv_plane(xs, weight + o * s.taps(), bias[o], s, offsets.data(), wide.data(), z.data());
      const acc* g = grad_out + planes.start(p);
      if (nhwc) {  // the plane's gradient, gathered from the channels_last layout
        for (int64_t q = 0; q < planes.lo; ++q) go[q] = g[q * planes.stride()];
        g = go.data();
      }
      widen(g, s.h, s.w, up.data());
      plane_backward(z.data(), up.data(), l, gamma[o], beta[o], mean[p], rstd[p], gz.data(), grad_beta[p],
                     grad_gamma[p]);
      acc sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < l; ++k) sum += gz[k];
      grad_bias[p] = sum;
      conv_weight_grad(xs, gz.data(), s, offsets.data(), gz_wide.data(), grad_weight + p * s.taps());
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

void check_nhwc(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              ": channels_last contiguous 4-D tensor expected");
  TORCH_CHECK(t.scalar_type() == dtype, name, ": dtype ", dtype, " expected, got ", t.scalar_type());
}

// forward on channels_last x and out (shapes as forward's).
void forward_nhwc(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, double eps, at::Tensor& out,
                  at::Tensor& mean, at::Tensor& rstd) {
  const auto acc = opmath(x.scalar_type());
  check_nhwc(x, "x", x.scalar_type()), check_nhwc(out, "out", x.scalar_type());
  check(gamma, "gamma", 1, acc), check(beta, "beta", 1, acc), check(mean, "mean", 2, acc), check(rstd, "rstd", 2, acc);
  const Nhwc s(x.size(0), x.size(1), x.size(2), x.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "forward_nhwc", [&] {
    using acc_scalar = acc_t<scalar_t>;
    forward_nhwc_impl(x.data_ptr<scalar_t>(), gamma.data_ptr<acc_scalar>(), beta.data_ptr<acc_scalar>(), eps,
                      out.data_ptr<scalar_t>(), mean.data_ptr<acc_scalar>(), rstd.data_ptr<acc_scalar>(), s);
  });
}

// backward on channels_last grad_out, x and grad_x (shapes as backward's).
void backward_nhwc(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                   const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_gamma,
                   at::Tensor& grad_beta) {
  const auto acc = opmath(x.scalar_type());
  check_nhwc(grad_out, "grad_out", x.scalar_type()), check_nhwc(x, "x", x.scalar_type());
  check_nhwc(grad_x, "grad_x", x.scalar_type());
  check(gamma, "gamma", 1, acc), check(beta, "beta", 1, acc), check(mean, "mean", 2, acc), check(rstd, "rstd", 2, acc);
  check(grad_gamma, "grad_gamma", 2, acc), check(grad_beta, "grad_beta", 2, acc);
  const Nhwc s(x.size(0), x.size(1), x.size(2), x.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "backward_nhwc", [&] {
    using acc_scalar = acc_t<scalar_t>;
    backward_nhwc_impl(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gamma.data_ptr<acc_scalar>(),
                       beta.data_ptr<acc_scalar>(), mean.data_ptr<acc_scalar>(), rstd.data_ptr<acc_scalar>(),
                       grad_x.data_ptr<scalar_t>(), grad_gamma.data_ptr<acc_scalar>(),
                       grad_beta.data_ptr<acc_scalar>(), s);
  });
}

ConvShape conv_shape(const at::Tensor& x, const at::Tensor& weight, int64_t pad) {
  return ConvShape(x.size(1), x.size(2), x.size(3), pad, weight.size(2), weight.size(3));
}

// x [N, Cin, H, W], conv weight [C, Cin, kh, kw], conv bias, gamma,
// beta [C], all float32 or float64; writes out [N, C, h / 2, w / 2] (contiguous or channels_last) and mean, rstd
// [N, C] of the conv planes.
void conv_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gamma,
                  const at::Tensor& beta, int64_t pad, double eps, at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) {
  const auto dt = x.scalar_type();
  check(x, "x", 4, dt), check(weight, "conv_weight", 4, dt), check(bias, "conv_bias", 1, dt);
  check(gamma, "gamma", 1, dt), check(beta, "beta", 1, dt);
  const bool nhwc = !out.is_contiguous();
  nhwc ? check_nhwc(out, "out", dt) : check(out, "out", 4, dt);
  check(mean, "mean", 2, dt), check(rstd, "rstd", 2, dt);
  const auto s = conv_shape(x, weight, pad);
  AT_DISPATCH_FLOATING_TYPES(dt, "conv_forward", [&] {
    conv_forward_impl(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                      gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), eps, out.data_ptr<scalar_t>(),
                      mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), x.size(0), weight.size(0), s, nhwc);
  });
}

// grad_out [N, C, h / 2, w / 2] (contiguous or channels_last) and what conv_forward read and wrote; writes the
// per-plane contributions grad_weight [N, C, Cin * kh * kw], grad_bias, grad_gamma, grad_beta [N, C] (summed over
// samples by torch).
void conv_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& gamma, const at::Tensor& beta, int64_t pad, const at::Tensor& mean,
                   const at::Tensor& rstd, at::Tensor& grad_weight, at::Tensor& grad_bias, at::Tensor& grad_gamma, at::Tensor& grad_beta) {
  const auto dt = x.scalar_type();
  const bool nhwc = !grad_out.is_contiguous();
  nhwc ? check_nhwc(grad_out, "grad_out", dt) : check(grad_out, "grad_out", 4, dt);
  check(x, "x", 4, dt), check(weight, "conv_weight", 4, dt);
  check(bias, "conv_bias", 1, dt), check(gamma, "gamma", 1, dt), check(beta, "beta", 1, dt);
  check(mean, "mean", 2, dt), check(rstd, "rstd", 2, dt), check(grad_weight, "grad_weight", 3, dt);
  check(grad_bias, "grad_bias", 2, dt), check(grad_gamma, "grad_gamma", 2, dt), check(grad_beta, "grad_beta", 2, dt);
  const auto s = conv_shape(x, weight, pad);
  AT_DISPATCH_FLOATING_TYPES(dt, "conv_backward", [&] {
    conv_backward_impl(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                       bias.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(),
                       mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(),
                       grad_bias.data_ptr<scalar_t>(), grad_gamma.data_ptr<scalar_t>(),
                       grad_beta.data_ptr<scalar_t>(), x.size(0), weight.size(0), s, nhwc);
  });
}
