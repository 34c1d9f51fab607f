// masked_feature_contrastive on CPU: the forward and the backward each in one call, so that the small
// per-sample steps (normalisation, logits, softmax) cost no torch dispatch between the two heavy passes.
//
// Per sample i, with L = H * W:
//   forward:  inv_msum = 1 / max(sum_l m[l], 1e-6); pooled[c] = inv_msum * sum_l f[c, l] m[l] (one read of
//             the features, never the product f * m); h = pooled / max(|pooled|, 1e-12);
//             logits = h mu^T / tau (torch's GEMM); loss = mean(-log_softmax(logits)[y]);
//             g = softmax(logits) - onehot(y) (exp by torch's vectorised kernel).
//   backward: grad_h = coef * g mu (torch's GEMM; coef = dloss / N / tau); through the normalisation to g_pooled;
//             grad_f[c, l] = m[l] * g_pooled[c] * inv_msum (one write).
// mu (the normalised prototypes) and its gradient g^T h stay in torch. Accumulation in float for float32
// and in double for float64 (at::opmath_type).
//
// Included by masked_contrastive.cpp once per ISA level (isa.h), each time inside a namespace of its own: every header
// it needs is included there, none here.

// Samples per parallel task, so that each task touches about 64 KiB of features or more.
int64_t grain(int64_t per_sample) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_sample)); }

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_contiguous() && t.dim() == dim, name, ": contiguous ", dim, "-D tensor expected");
}

// One sample: out[j] = inv * sum_k f[j, k] * m[k] for rows j of f [c, l]. Four rows at a time, so that
// four independent vector accumulators are in flight and each mask vector load serves four rows.
template <typename scalar_t>
void pool_rows(const scalar_t* f, const scalar_t* m, at::opmath_type<scalar_t> inv, scalar_t* out, int64_t c,
               int64_t l) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t j = 0;
  for (; j + 4 <= c; j += 4) {
    const scalar_t *r0 = f + j * l, *r1 = r0 + l, *r2 = r1 + l, *r3 = r2 + l;
    acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t k = 0; k < l; ++k) {
      const acc_t mk = m[k];
      s0 += static_cast<acc_t>(r0[k]) * mk;
      s1 += static_cast<acc_t>(r1[k]) * mk;
      s2 += static_cast<acc_t>(r2[k]) * mk;
      s3 += static_cast<acc_t>(r3[k]) * mk;
    }
    out[j] = s0 * inv, out[j + 1] = s1 * inv, out[j + 2] = s2 * inv, out[j + 3] = s3 * inv;
  }
  for (; j < c; ++j) {
    const scalar_t* row = f + j * l;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < l; ++k) sum += static_cast<acc_t>(row[k]) * static_cast<acc_t>(m[k]);
    out[j] = sum * inv;
  }
}

// One sample: grad[j, k] = m[k] * scale_j for rows j of grad [c, l], scale_j = scale(j).
template <typename scalar_t, typename Scale>
void unpool_rows(const scalar_t* m, Scale scale, scalar_t* grad, int64_t c, int64_t l) {
  for (int64_t j = 0; j < c; ++j) {
    scalar_t* row = grad + j * l;
    const scalar_t s = static_cast<scalar_t>(scale(j));
#pragma omp simd
    for (int64_t k = 0; k < l; ++k) row[k] = m[k] * s;
  }
}

// Per sample: inv_msum, pooled (one read of the features), its norm and h = pooled / max(norm, 1e-12).
template <typename scalar_t>
void pool_normalise_impl(const scalar_t* f, const scalar_t* m, scalar_t* h, scalar_t* norm, scalar_t* inv_msum,
                         int64_t n, int64_t c, int64_t l) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, grain(c * l), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* mi = m + i * l;
      scalar_t* hi = h + i * c;
      acc_t msum = 0;
#pragma omp simd reduction(+ : msum)
      for (int64_t t = 0; t < l; ++t) msum += mi[t];
      const acc_t inv = acc_t(1) / std::max(msum, acc_t(1e-6));
      inv_msum[i] = static_cast<scalar_t>(inv);
      pool_rows(f + i * c * l, mi, inv, hi, c, l);  // hi = pooled
      acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < c; ++j) sq += static_cast<acc_t>(hi[j]) * hi[j];
      const acc_t nrm = std::sqrt(sq), inv_norm = acc_t(1) / std::max(nrm, acc_t(1e-12));
      norm[i] = static_cast<scalar_t>(nrm);
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) hi[j] = static_cast<scalar_t>(hi[j] * inv_norm);
    }
  });
}

// g holds h mu^T: turn each row into the shifted logits z = (g - max) / tau and keep z[y] in zy.
// N x K work: serial (a parallel region would cost more than it saves).
template <typename scalar_t>
void shift_impl(const int64_t* labels, double tau, scalar_t* g, scalar_t* zy, int64_t n, int64_t k) {
  const scalar_t inv_tau = static_cast<scalar_t>(1 / tau);
  for (int64_t i = 0; i < n; ++i) {
    scalar_t* gi = g + i * k;
    const scalar_t top = *std::max_element(gi, gi + k);
#pragma omp simd
    for (int64_t q = 0; q < k; ++q) gi[q] = (gi[q] - top) * inv_tau;
    zy[i] = gi[labels[i]];
  }
}

// g holds exp(z) for the shifted logits z: normalise it to softmax and subtract the one-hot labels.
// Returns the mean loss, mean_i log(sum_q exp(z_iq)) - z_iy. Serial, as shift_impl.
template <typename scalar_t>
double softmax_impl(const int64_t* labels, const scalar_t* zy, scalar_t* g, int64_t n, int64_t k) {
  using acc_t = at::opmath_type<scalar_t>;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    scalar_t* gi = g + i * k;
    acc_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t q = 0; q < k; ++q) total += gi[q];
    const acc_t inv = acc_t(1) / total;
#pragma omp simd
    for (int64_t q = 0; q < k; ++q) gi[q] = static_cast<scalar_t>(gi[q] * inv);
    gi[labels[i]] -= 1;
    sum += std::log(static_cast<double>(total)) - zy[i];
  }
  return sum / n;
}

// Per sample: through the normalisation (grad_h given) to g_pooled, then grad_f[c, l] = m[l] g_pooled[c] inv_msum.
template <typename scalar_t>
void backward_impl(const scalar_t* grad_h, const scalar_t* h, const scalar_t* norm, const scalar_t* inv_msum,
                   const scalar_t* m, scalar_t* grad, int64_t n, int64_t c, int64_t l) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, grain(c * l), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t *hi = h + i * c, *gi = grad_h + i * c;
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < c; ++j) dot += static_cast<acc_t>(hi[j]) * gi[j];
      // h = pooled / max(|pooled|, eps): the radial part only where the norm is above eps (as F.normalize)
      const acc_t nrm = norm[i], radial = nrm > acc_t(1e-12) ? dot : acc_t(0);
      const acc_t factor = static_cast<acc_t>(inv_msum[i]) / std::max(nrm, acc_t(1e-12));
      unpool_rows(m + i * l, [&](int64_t j) { return (gi[j] - hi[j] * radial) * factor; }, grad + i * c * l, c, l);
    }
  });
}

template <typename scalar_t>
void pool_backward_impl(const scalar_t* m, const scalar_t* s, scalar_t* out, int64_t n, int64_t c, int64_t l) {
  at::parallel_for(0, n, grain(c * l), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      unpool_rows(m + i * l, [&](int64_t j) { return s[i * c + j]; }, out + i * c * l, c, l);
  });
}

void check_dtype(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ": dtype ", like.scalar_type(), " expected");
}

// features [N, C, L], masks [N, L], labels [N] int64, mu [K, C]; writes h [N, C], norm [N], g [N, K],
// inv_msum [N] and the mean loss [] (all in the features' dtype).
void forward_outputs(const at::Tensor& features, const at::Tensor& masks, const at::Tensor& labels,
                     const at::Tensor& mu, double tau, at::Tensor& h, at::Tensor& norm, at::Tensor& g,
                     at::Tensor& inv_msum, at::Tensor& loss) {
  check(features, "features", 3), check(masks, "masks", 2), check(labels, "labels", 1), check(mu, "mu", 2);
  check(h, "h", 2), check(norm, "norm", 1), check(g, "g", 2), check(inv_msum, "inv_msum", 1), check(loss, "loss", 0);
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels: int64 expected");
  for (auto [t, name] : {std::pair{&masks, "masks"}, {&mu, "mu"}, {&h, "h"}, {&norm, "norm"}, {&g, "g"},
                         {&inv_msum, "inv_msum"}, {&loss, "loss"}})
    check_dtype(*t, name, features);
  const int64_t n = features.size(0), c = features.size(1), l = features.size(2), k = mu.size(0);
  const at::Tensor zy = at::empty({n}, features.options());
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "forward", [&] {
    pool_normalise_impl(features.data_ptr<scalar_t>(), masks.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                        norm.data_ptr<scalar_t>(), inv_msum.data_ptr<scalar_t>(), n, c, l);
    at::mm_out(g, h, mu.t());  // torch's GEMM
    shift_impl(labels.data_ptr<int64_t>(), tau, g.data_ptr<scalar_t>(), zy.data_ptr<scalar_t>(), n, k);
    g.exp_();  // torch's vectorised exp
    loss.fill_(softmax_impl(labels.data_ptr<int64_t>(), zy.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), n, k));
  });
}

// The outputs of forward, masks [N, L], mu [K, C] and coef = dloss / N / tau; writes grad_features [N, C, L].
void backward_features(const at::Tensor& g, const at::Tensor& h, const at::Tensor& norm, const at::Tensor& inv_msum,
                       const at::Tensor& masks, const at::Tensor& mu, double coef, at::Tensor& grad_features) {
  check(g, "g", 2), check(h, "h", 2), check(norm, "norm", 1), check(inv_msum, "inv_msum", 1);
  check(masks, "masks", 2), check(mu, "mu", 2), check(grad_features, "grad_features", 3);
  for (auto [t, name] : {std::pair{&h, "h"}, {&norm, "norm"}, {&inv_msum, "inv_msum"}, {&masks, "masks"},
                         {&mu, "mu"}, {&grad_features, "grad_features"}})
    check_dtype(*t, name, g);
  const at::Tensor grad_h = at::mm(g, mu).mul_(coef);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "backward", [&] {
    backward_impl(grad_h.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), norm.data_ptr<scalar_t>(),
                  inv_msum.data_ptr<scalar_t>(), masks.data_ptr<scalar_t>(), grad_features.data_ptr<scalar_t>(),
                  grad_features.size(0), grad_features.size(1), grad_features.size(2));
  });
}

void pool_backward(const at::Tensor& masks, const at::Tensor& scale, at::Tensor& grad_features) {
  check(masks, "masks", 2), check(scale, "scale", 2), check(grad_features, "grad_features", 3);
  check_dtype(scale, "scale", masks), check_dtype(grad_features, "grad_features", masks);
  AT_DISPATCH_FLOATING_TYPES(masks.scalar_type(), "pool_backward", [&] {
    pool_backward_impl(masks.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), grad_features.data_ptr<scalar_t>(),
                       grad_features.size(0), grad_features.size(1), grad_features.size(2));
  });
}

// The whole op as a C++ autograd node, so that neither direction runs Python: prototypes [K, C] are normalised
// here (mu), and the backward returns the gradients of features and, when asked, of the prototypes (through
// the normalisation). poison: fill every fresh buffer with NaN first (tests).
struct MaskedContrastive : public torch::autograd::Function<MaskedContrastive> {
  static at::Tensor fresh(at::IntArrayRef shape, const at::Tensor& like, bool poison) {
    at::Tensor t = at::empty(shape, like.options());
    return poison ? t.fill_(std::numeric_limits<double>::quiet_NaN()) : t;
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& features, const at::Tensor& masks,
                            const at::Tensor& labels, const at::Tensor& prototypes, double tau, bool poison) {
    const int64_t n = features.size(0), c = features.size(1), k = prototypes.size(0);
    const at::Tensor flat = features.reshape({n, c, -1}).contiguous();
    const at::Tensor proto_norm = at::linalg_vector_norm(prototypes, 2, {1});
    const at::Tensor mu = prototypes / proto_norm.clamp_min(1e-12).unsqueeze(1);
    at::Tensor h = fresh({n, c}, masks, poison), g = fresh({n, k}, masks, poison), norm = fresh({n}, masks, poison);
    at::Tensor inv_msum = fresh({n}, masks, poison), loss = fresh({}, masks, poison);
    forward_outputs(flat, masks, labels, mu, tau, h, norm, g, inv_msum, loss);
    ctx->save_for_backward({masks, mu, proto_norm, h, norm, g, inv_msum});
    ctx->saved_data["tau"] = tau;
    ctx->saved_data["poison"] = poison;
    ctx->saved_data["shape"] = features.sizes().vec();
    ctx->set_materialize_grads(false);
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor& grad_loss = grad_outputs[0];
    torch::autograd::variable_list grads(6);
    if (!grad_loss.defined()) return grads;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &masks = saved[0], &mu = saved[1], &proto_norm = saved[2], &h = saved[3], &norm = saved[4],
                     &g = saved[5], &inv_msum = saved[6];
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const double coef = grad_loss.item<double>() / (h.size(0) * ctx->saved_data["tau"].toDouble());
    if (ctx->needs_input_grad(0)) {
      at::Tensor grad = fresh({h.size(0), h.size(1), masks.size(1)}, masks, ctx->saved_data["poison"].toBool());
      backward_features(g, h, norm, inv_msum, masks, mu, coef, grad);
      grads[0] = grad.view(shape);
    }
    if (ctx->needs_input_grad(3)) {  // through mu = p / max(|p|, eps), as F.normalize
      const at::Tensor grad_mu = at::mm(g.t(), h).mul_(coef);
      const at::Tensor radial = mu * (mu * grad_mu).sum(1, true) * (proto_norm > 1e-12).unsqueeze(1);
      grads[3] = (grad_mu - radial) / proto_norm.clamp_min(1e-12).unsqueeze(1);
    }
    return grads;
  }
};

at::Tensor loss(const at::Tensor& features, const at::Tensor& masks, const at::Tensor& labels,
                const at::Tensor& prototypes, double tau, bool poison) {
  return MaskedContrastive::apply(features, masks, labels, prototypes, tau, poison);
}
