// One drawing step's alignment and sentence context without gradients (sampling, evaluation),
// in one pass per image: the weights α_t (B, L), a softmax over the real words of the scores
// 2·Σ_a v_a / (1 + F[b, l, a]·Q[b, a]), and the mix Σ_l α_l·values[b, l, :] (B, D). F = e^(−2k)
// are the caption's key factors and Q = e^(−2q) the step's query factors, both clamped as in
// aligndraw/alignment.py (factored_scores); the scores' −Σ_a v_a is the same for every word and
// cancels in the softmax, so it is left out. Eagerly, PyTorch's ops take three passes over the
// (B, L, A) factors for the scores and a dozen calls a step; here each image is one loop, the
// images split over PyTorch's threads. Loaded by aligndraw/alignment.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

// The loops below built for AVX-512, AVX2 with FMA and the baseline, chosen when loaded.
#if defined(__x86_64__) && defined(__GNUC__)
#define ALIGNDRAW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ALIGNDRAW_CLONES
#endif

namespace {

// Σ_a v_a / (1 + f_a·q_a) over one word's factors
ALIGNDRAW_CLONES float score(const float* f, const float* q, const float* v, int64_t a) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < a; ++i) acc += v[i] / (1.f + f[i] * q[i]);
  return acc;
}

// out = Σ_l alpha_l·values[l, :] over an image's L rows of D values
ALIGNDRAW_CLONES void mix(float* out, const float* values, const float* alpha, int64_t l, int64_t d) {
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

void check(const at::Tensor& t, const char* name, int64_t dim, at::ScalarType type) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.dim() == dim,
              "aligndraw_alignment.context: ", name, " must be a ", dim, "-d CPU ", type,
              " tensor, got a ", t.dim(), "-d ", t.device(), " ", t.scalar_type(), " one");
}

// factors (B, L, A), query_factors (B, A) or (1, A), v (A,), mask (B, L) bool, values (B, L, D)
// → α (B, L), mixed (B, D)
std::tuple<at::Tensor, at::Tensor> context(const at::Tensor& factors, const at::Tensor& query_factors,
                                           const at::Tensor& v, const at::Tensor& mask,
                                           const at::Tensor& values) {
  check(factors, "factors", 3, at::kFloat);
  check(query_factors, "query_factors", 2, at::kFloat);
  check(v, "v", 1, at::kFloat);
  check(mask, "mask", 2, at::kBool);
  check(values, "values", 3, at::kFloat);
  const int64_t b = factors.size(0), l = factors.size(1), a = factors.size(2), d = values.size(2);
  const int64_t qb = query_factors.size(0);
  TORCH_CHECK((qb == b || qb == 1) && query_factors.size(1) == a && v.size(0) == a &&
                  mask.size(0) == b && mask.size(1) == l && values.size(0) == b && values.size(1) == l,
              "aligndraw_alignment.context: shapes must be factors (B, L, A), query_factors (B|1, A), "
              "v (A,), mask (B, L), values (B, L, D); got ", factors.sizes(), ", ", query_factors.sizes(),
              ", ", v.sizes(), ", ", mask.sizes(), ", ", values.sizes());
  const at::Tensor f = factors.contiguous(), q = query_factors.contiguous(), vv = v.contiguous(),
                   m = mask.contiguous(), x = values.contiguous();
  at::Tensor alpha = at::empty({b, l}, factors.options());
  at::Tensor mixed = at::empty({b, d}, values.options());
  const float *fp = f.data_ptr<float>(), *qp = q.data_ptr<float>(), *vp = vv.data_ptr<float>(),
              *xp = x.data_ptr<float>();
  const bool* mp = m.data_ptr<bool>();
  float *ap = alpha.data_ptr<float>(), *op = mixed.data_ptr<float>();
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      weights(ap + i * l, fp + i * l * a, qp + (qb == 1 ? 0 : i * a), vp, mp + i * l, l, a);
      mix(op + i * d, xp + i * l * d, ap + i * l, l, d);
    }
  });
  return {alpha, mixed};
}

}  // namespace

TORCH_LIBRARY(aligndraw_alignment, m) {
  m.def("context(Tensor factors, Tensor query_factors, Tensor v, Tensor mask, Tensor values) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aligndraw_alignment, CPU, m) { m.impl("context", &context); }
