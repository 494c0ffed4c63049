// A drawing step's elementwise work without gradients (eager sampling and evaluation), one op
// per piece and one pass per image, the images split over PyTorch's threads, where PyTorch's
// ops take a dozen calls each. Loaded by aligndraw/step_kernels.py, which compiles it for the
// processor's vector instructions (PyTorch's at::vec, as inductor's kernels are compiled).
//
// context: the alignment's weights α_t (B, L), a softmax over the real words of the scores
//   2·Σ_a v_a / (1 + F[b, l, a]·Q[b, a]), and the mix Σ_l α_l·values[b, l, :] (B, D). F = e^(−2k)
//   are the caption's key factors and Q = e^(−2q) the step's query factors, computed here from
//   2q, each clamped to ±bound first as in aligndraw/alignment.py (factored_scores); the
//   scores' −Σ_a v_a is the same for every word and cancels in the softmax, so it is left out.
// lstm: h, c of an LSTM cell (gates i, f, g, o) from the sum of its gates' shares and c.
// prior_sample: z = μ + e^(log σ)·ε with μ, log σ = tanh of the prior's pre-activations.
// tanh is 2σ(2x) − 1 throughout, as aligndraw.language.sigmoid_tanh computes it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

Vec sigmoid(const Vec& x) { return (Vec(1.f) + x.neg().exp()).reciprocal(); }
Vec tanh_of(const Vec& x) { return Vec(2.f) * sigmoid(Vec(2.f) * x) - Vec(1.f); }

// Σ_a v_a / (1 + f_a·q_a) over one word's factors
float score(const float* f, const float* q, const float* v, int64_t a) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < a; ++i) acc += v[i] / (1.f + f[i] * q[i]);
  return acc;
}

// out = Σ_l alpha_l·values[l, :] over an image's L rows of D values
void mix(float* out, const float* values, const float* alpha, int64_t l, int64_t d) {
  std::fill(out, out + d, 0.f);
  for (int64_t w = 0; w < l; ++w) {
    const float weight = alpha[w];
    const float* row = values + w * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) out[j] += weight * row[j];
  }
}

// α for one image: the softmax of its words' scores, 0 on padding (NaN where no word is real,
// as torch.softmax over -inf gives)
void weights(float* alpha, const float* f, const float* q, const float* v, const bool* mask,
             int64_t l, int64_t a) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t w = 0; w < l; ++w) {
    alpha[w] = mask[w] ? 2.f * score(f + w * a, q, v, a) : -std::numeric_limits<float>::infinity();
    top = std::max(top, alpha[w]);
  }
  float total = 0.f;
  for (int64_t w = 0; w < l; ++w) total += alpha[w] = std::exp(alpha[w] - top);
  for (int64_t w = 0; w < l; ++w) alpha[w] /= total;
}

void check(const at::Tensor& t, const char* op, const char* name, int64_t dim,
           at::ScalarType type = at::kFloat) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.dim() == dim, "aligndraw_step.",
              op, ": ", name, " must be a ", dim, "-d CPU ", type, " tensor, got a ", t.dim(), "-d ",
              t.device(), " ", t.scalar_type(), " one");
}

// A matrix whose rows the kernels read with a row stride: its last dimension dense
at::Tensor rows(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// q = e^(−clamp(query2, ±bound)) for one image's A values
void query_factors(float* q, const float* query2, double bound, int64_t a) {
  const Vec lo(static_cast<float>(-bound)), hi(static_cast<float>(bound));
  for (int64_t i = 0; i < a; i += Vec::size()) {
    const int64_t k = std::min<int64_t>(Vec::size(), a - i);
    at::vec::clamp(Vec::loadu(query2 + i, k), lo, hi).neg().exp().store(q + i, k);
  }
}

// factors (B, L, A), query2 (B, A) or (1, A), v (A,), mask (B, L) bool, values (B, L, D)
// → α (B, L), mixed (B, D)
std::tuple<at::Tensor, at::Tensor> context(const at::Tensor& factors, const at::Tensor& query2,
                                           double bound, const at::Tensor& v, const at::Tensor& mask,
                                           const at::Tensor& values) {
  check(factors, "context", "factors", 3);
  check(query2, "context", "query2", 2);
  check(v, "context", "v", 1);
  check(mask, "context", "mask", 2, at::kBool);
  check(values, "context", "values", 3);
  const int64_t b = factors.size(0), l = factors.size(1), a = factors.size(2), d = values.size(2);
  const int64_t qb = query2.size(0);
  TORCH_CHECK((qb == b || qb == 1) && query2.size(1) == a && v.size(0) == a &&
                  mask.size(0) == b && mask.size(1) == l && values.size(0) == b && values.size(1) == l,
              "aligndraw_step.context: shapes must be factors (B, L, A), query2 (B|1, A), "
              "v (A,), mask (B, L), values (B, L, D); got ", factors.sizes(), ", ", query2.sizes(),
              ", ", v.sizes(), ", ", mask.sizes(), ", ", values.sizes());
  const at::Tensor f = factors.contiguous(), q = rows(query2), vv = v.contiguous(),
                   m = mask.contiguous(), x = values.contiguous();
  at::Tensor alpha = at::empty({b, l}, factors.options());
  at::Tensor mixed = at::empty({b, d}, values.options());
  const float *fp = f.data_ptr<float>(), *qp = q.data_ptr<float>(), *vp = vv.data_ptr<float>(),
              *xp = x.data_ptr<float>();
  const bool* mp = m.data_ptr<bool>();
  float *ap = alpha.data_ptr<float>(), *op = mixed.data_ptr<float>();
  const int64_t qs = qb == 1 ? 0 : q.stride(0);
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> factors_q(a);
    for (int64_t i = lo; i < hi; ++i) {
      query_factors(factors_q.data(), qp + i * qs, bound, a);
      weights(ap + i * l, fp + i * l * a, factors_q.data(), vp, mp + i * l, l, a);
      mix(op + i * d, xp + i * l * d, ap + i * l, l, d);
    }
  });
  return {alpha, mixed};
}

// parts: the gates' shares, each (B, 4D) or (1, 4D) (summed); c (B, D) → h, c (B, D)
std::tuple<at::Tensor, at::Tensor> lstm(const std::vector<at::Tensor>& parts, const at::Tensor& c) {
  TORCH_CHECK(!parts.empty(), "aligndraw_step.lstm: needs at least one share of the gates");
  check(c, "lstm", "c", 2);
  const int64_t b = c.size(0), d = c.size(1);
  std::vector<at::Tensor> gates;
  std::vector<const float*> gp;
  std::vector<int64_t> gs;
  for (const at::Tensor& p : parts) {
    check(p, "lstm", "each share of the gates", 2);
    TORCH_CHECK((p.size(0) == b || p.size(0) == 1) && p.size(1) == 4 * d, "aligndraw_step.lstm: each "
                "share of the gates must be (B, 4D) or (1, 4D), B, D = ", b, ", ", d, " from c, got ",
                p.sizes());
    gates.push_back(rows(p));
    gp.push_back(gates.back().data_ptr<float>());
    gs.push_back(p.size(0) == 1 ? 0 : gates.back().stride(0));  // one row: the same for every image
  }
  const at::Tensor cc = c.contiguous();
  at::Tensor h = at::empty({b, d}, c.options()), c_new = at::empty({b, d}, c.options());
  const float* cp = cc.data_ptr<float>();
  float *hp = h.data_ptr<float>(), *np = c_new.data_ptr<float>();
  const int64_t n = static_cast<int64_t>(gp.size()), w = Vec::size();
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      for (int64_t j = 0; j < d; j += w) {
        const int64_t k = std::min(w, d - j);
        Vec pre[4];
        for (int64_t g = 0; g < 4; ++g) {
          pre[g] = Vec::loadu(gp[0] + r * gs[0] + g * d + j, k);
          for (int64_t s = 1; s < n; ++s) pre[g] = pre[g] + Vec::loadu(gp[s] + r * gs[s] + g * d + j, k);
        }
        const Vec cell = sigmoid(pre[1]) * Vec::loadu(cp + r * d + j, k) + sigmoid(pre[0]) * tanh_of(pre[2]);
        cell.store(np + r * d + j, k);
        (sigmoid(pre[3]) * tanh_of(cell)).store(hp + r * d + j, k);
      }
    }
  });
  return {h, c_new};
}

// pre (B, 2Z): the prior's pre-activations (μ's, then log σ's); eps (B, Z) → z (B, Z)
at::Tensor prior_sample(const at::Tensor& pre, const at::Tensor& eps) {
  check(pre, "prior_sample", "pre", 2);
  check(eps, "prior_sample", "eps", 2);
  const int64_t b = eps.size(0), z = eps.size(1);
  TORCH_CHECK(pre.size(0) == b && pre.size(1) == 2 * z, "aligndraw_step.prior_sample: pre must be "
              "(B, 2Z) = (", b, ", ", 2 * z, ") for eps ", eps.sizes(), ", got ", pre.sizes());
  const at::Tensor p = rows(pre), e = rows(eps);
  at::Tensor out = at::empty({b, z}, eps.options());
  const float *pp = p.data_ptr<float>(), *ep = e.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ps = p.stride(0), es = e.stride(0), w = Vec::size();
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      for (int64_t j = 0; j < z; j += w) {
        const int64_t k = std::min(w, z - j);
        const Vec mu = tanh_of(Vec::loadu(pp + r * ps + j, k));
        const Vec log_sigma = tanh_of(Vec::loadu(pp + r * ps + z + j, k));
        (mu + log_sigma.exp() * Vec::loadu(ep + r * es + j, k)).store(op + r * z + j, k);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(aligndraw_step, m) {
  m.def("context(Tensor factors, Tensor query2, float bound, Tensor v, Tensor mask, Tensor values) -> (Tensor, Tensor)");
  m.def("lstm(Tensor[] parts, Tensor c) -> (Tensor, Tensor)");
  m.def("prior_sample(Tensor pre, Tensor eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(aligndraw_step, CPU, m) {
  m.impl("context", &context);
  m.impl("lstm", &lstm);
  m.impl("prior_sample", &prior_sample);
}
