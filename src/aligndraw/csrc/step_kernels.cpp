// A drawing step's elementwise work (eager sampling, evaluation and training), one op per piece
// and one pass per image, the images split over PyTorch's threads, where PyTorch's ops take a
// dozen calls each and autograd as many again. Loaded by aligndraw/step_kernels.py, which
// compiles it for the processor's vector instructions (PyTorch's at::vec, as inductor's kernels
// are compiled) and wraps the ops that carry gradients in autograd functions.
//
// context: the alignment's weights α_t (B, L), a softmax over the real words of the scores
//   2·Σ_a v_a / (1 + F[b, l, a]·Q[b, a]), and the mix Σ_l α_l·values[b, l, :] (B, D). F = e^(−2k)
//   are the caption's key factors and Q = e^(−2q) the step's query factors, computed here from
//   2q, each clamped to ±bound first as in aligndraw/alignment.py (factored_scores); the
//   scores' −Σ_a v_a is the same for every word and cancels in the softmax, so it is left out.
// lstm: h, c of an LSTM cell (gates i, f, g, o) from the sum of its gates' shares and c;
//   lstm_forward also keeps the activations lstm_backward takes.
// prior_sample: z = μ + e^(log σ)·ε with μ, log σ = tanh of the prior's pre-activations.
// scores: the alignment's scores, as context's but with the −Σ_a v_a, and scores_backward their
//   gradient (aligndraw/alignment.py's _FactoredScores).
// posterior_kl: z = μ_q + e^(log σ_q)·ε and KL(q ‖ p) against the learned prior (or N(0, I));
//   posterior_kl_backward its gradient.
// attend: the windows' γ and filterbanks F_x, F_y from their five raw numbers, as
//   aligndraw/attention.py (window_params, filterbank) computes them; attend_backward their
//   gradient.
// tanh is 2σ(2x) − 1 throughout, as aligndraw.language.sigmoid_tanh computes it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
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

// The alignment's scores 2·Σ_a v_a·s_la − Σ_a v_a (B, L) with s = σ(2k + 2q) = 1/(1 + F·Q), as
// aligndraw/alignment.py (factored_scores) gives them with its gradient; factors F (B, L, A),
// query2 (B|1, A), v (A,)
at::Tensor scores(const at::Tensor& factors, const at::Tensor& query2, double bound, const at::Tensor& v) {
  check(factors, "scores", "factors", 3);
  check(query2, "scores", "query2", 2);
  check(v, "scores", "v", 1);
  const int64_t b = factors.size(0), l = factors.size(1), a = factors.size(2), qb = query2.size(0);
  TORCH_CHECK((qb == b || qb == 1) && query2.size(1) == a && v.size(0) == a, "aligndraw_step.scores: "
              "shapes must be factors (B, L, A), query2 (B|1, A), v (A,); got ", factors.sizes(), ", ",
              query2.sizes(), ", ", v.sizes());
  const at::Tensor f = factors.contiguous(), q = rows(query2), vv = v.contiguous();
  at::Tensor out = at::empty({b, l}, factors.options());
  const float *fp = f.data_ptr<float>(), *qp = q.data_ptr<float>(), *vp = vv.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qs = qb == 1 ? 0 : q.stride(0);
  float v_sum = 0.f;
  for (int64_t i = 0; i < a; ++i) v_sum += vp[i];
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> factors_q(a);
    for (int64_t i = lo; i < hi; ++i) {
      query_factors(factors_q.data(), qp + i * qs, bound, a);
      for (int64_t w = 0; w < l; ++w) op[i * l + w] = 2.f * score(fp + (i * l + w) * a, factors_q.data(), vp, a) - v_sum;
    }
  });
  return out;
}

// The gradients of keys2 (B, L, A), query2 (B|1, A: summed over the images for one row)
// and v (A,) from the scores' (B, L): with s computed again, 2g·v·s(1 − s) for the keys (the
// query's is its sum over the words: the clamp is not differentiated, as in alignment.py), and
// 2·Σ g·s − Σ g for v
std::tuple<at::Tensor, at::Tensor, at::Tensor> scores_backward(const at::Tensor& grad,
                                                               const at::Tensor& factors,
                                                               const at::Tensor& query2, double bound,
                                                               const at::Tensor& v) {
  check(grad, "scores_backward", "grad", 2);
  check(factors, "scores_backward", "factors", 3);
  check(query2, "scores_backward", "query2", 2);
  check(v, "scores_backward", "v", 1);
  const int64_t b = factors.size(0), l = factors.size(1), a = factors.size(2), qb = query2.size(0);
  TORCH_CHECK(grad.size(0) == b && grad.size(1) == l && (qb == b || qb == 1) && query2.size(1) == a &&
                  v.size(0) == a,
              "aligndraw_step.scores_backward: shapes must be grad (B, L), factors (B, L, A), "
              "query2 (B|1, A), v (A,); got ", grad.sizes(), ", ", factors.sizes(), ", ", query2.sizes(),
              ", ", v.sizes());
  const at::Tensor g = grad.contiguous(), f = factors.contiguous(), q = rows(query2), vv = v.contiguous();
  at::Tensor d_keys = at::empty({b, l, a}, factors.options());
  at::Tensor d_query = at::empty({b, a}, factors.options());  // per image; summed below for one row
  at::Tensor gs_sums = at::empty({b, a}, factors.options());  // Σ_l 2g·s per image, summed below
  const float *gp = g.data_ptr<float>(), *fp = f.data_ptr<float>(), *qp = q.data_ptr<float>(),
              *vp = vv.data_ptr<float>();
  float *kp = d_keys.data_ptr<float>(), *dqp = d_query.data_ptr<float>(), *sp = gs_sums.data_ptr<float>();
  const int64_t qs = qb == 1 ? 0 : q.stride(0), w = Vec::size();
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> factors_q(a);
    for (int64_t i = lo; i < hi; ++i) {
      query_factors(factors_q.data(), qp + i * qs, bound, a);
      float* dq = dqp + i * a;  // the query's gradient, this image's
      float* sums = sp + i * a;
      std::fill(dq, dq + a, 0.f);
      std::fill(sums, sums + a, 0.f);
      for (int64_t word = 0; word < l; ++word) {
        const Vec g2(2.f * gp[i * l + word]);
        const float* frow = fp + (i * l + word) * a;
        float* krow = kp + (i * l + word) * a;
        for (int64_t j = 0; j < a; j += w) {
          const int64_t k = std::min(w, a - j);
          const Vec s = (Vec(1.f) + Vec::loadu(frow + j, k) * Vec::loadu(factors_q.data() + j, k)).reciprocal();
          const Vec gs = g2 * s;
          const Vec dy = gs * (Vec(1.f) - s) * Vec::loadu(vp + j, k);
          dy.store(krow + j, k);
          (Vec::loadu(dq + j, k) + dy).store(dq + j, k);
          (Vec::loadu(sums + j, k) + gs).store(sums + j, k);
        }
      }
    }
  });
  float g_sum = 0.f;
  for (int64_t i = 0; i < b * l; ++i) g_sum += gp[i];
  at::Tensor d_v = gs_sums.sum(0) - g_sum;  // 2·Σ g·s (the 2 is in g2) − Σ g, the same whatever the threads
  return {d_keys, qb == 1 ? d_query.sum(0, true) : d_query, d_v};
}

// The gates' shares, each (B, 4D) or (1, 4D) (one row: the same for every image), to be summed
struct Shares {
  std::vector<at::Tensor> kept;
  std::vector<const float*> data;
  std::vector<int64_t> stride;

  Shares(const std::vector<at::Tensor>& parts, int64_t b, int64_t d, const char* op) {
    TORCH_CHECK(!parts.empty(), "aligndraw_step.", op, ": needs at least one share of the gates");
    for (const at::Tensor& p : parts) {
      check(p, op, "each share of the gates", 2);
      TORCH_CHECK((p.size(0) == b || p.size(0) == 1) && p.size(1) == 4 * d, "aligndraw_step.", op,
                  ": each share of the gates must be (B, 4D) or (1, 4D), B, D = ", b, ", ", d,
                  " from c, got ", p.sizes());
      kept.push_back(rows(p));
      data.push_back(kept.back().data_ptr<float>());
      stride.push_back(p.size(0) == 1 ? 0 : kept.back().stride(0));
    }
  }
  // the summed pre-activation of gate g (0..3: i, f, g, o) at row r, columns j..j+k
  Vec sum(int64_t r, int64_t g, int64_t d, int64_t j, int64_t k) const {
    Vec pre = Vec::loadu(data[0] + r * stride[0] + g * d + j, k);
    for (size_t s = 1; s < data.size(); ++s) pre = pre + Vec::loadu(data[s] + r * stride[s] + g * d + j, k);
    return pre;
  }
};

// The cell from its shares and c: h, c' (B, D), and where `keep`, the activations the gradient
// needs, (B, 5D): σ(i), σ(f), tanh(g), σ(o), tanh(c')
std::tuple<at::Tensor, at::Tensor, at::Tensor> cell(const std::vector<at::Tensor>& parts,
                                                    const at::Tensor& c, bool keep, const char* op) {
  check(c, op, "c", 2);
  const int64_t b = c.size(0), d = c.size(1);
  const Shares shares(parts, b, d, op);
  const at::Tensor cc = c.contiguous();
  at::Tensor h = at::empty({b, d}, c.options()), c_new = at::empty({b, d}, c.options());
  at::Tensor acts = keep ? at::empty({b, 5 * d}, c.options()) : at::Tensor();
  const float* cp = cc.data_ptr<float>();
  float *hp = h.data_ptr<float>(), *np = c_new.data_ptr<float>();
  float* ap = keep ? acts.data_ptr<float>() : nullptr;
  const int64_t w = Vec::size();
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      for (int64_t j = 0; j < d; j += w) {
        const int64_t k = std::min(w, d - j);
        const Vec i = sigmoid(shares.sum(r, 0, d, j, k)), f = sigmoid(shares.sum(r, 1, d, j, k)),
                  g = tanh_of(shares.sum(r, 2, d, j, k)), o = sigmoid(shares.sum(r, 3, d, j, k));
        const Vec cell = f * Vec::loadu(cp + r * d + j, k) + i * g, tc = tanh_of(cell);
        cell.store(np + r * d + j, k);
        (o * tc).store(hp + r * d + j, k);
        if (ap) {
          float* row = ap + r * 5 * d + j;
          i.store(row, k);
          f.store(row + d, k);
          g.store(row + 2 * d, k);
          o.store(row + 3 * d, k);
          tc.store(row + 4 * d, k);
        }
      }
    }
  });
  return {h, c_new, acts};
}

// parts: the gates' shares, each (B, 4D) or (1, 4D) (summed); c (B, D) → h, c (B, D)
std::tuple<at::Tensor, at::Tensor> lstm(const std::vector<at::Tensor>& parts, const at::Tensor& c) {
  auto [h, c_new, acts] = cell(parts, c, false, "lstm");
  return {h, c_new};
}

// lstm, and the activations (B, 5D) lstm_backward takes
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_forward(const std::vector<at::Tensor>& parts,
                                                            const at::Tensor& c) {
  return cell(parts, c, true, "lstm_forward");
}

// The gradients of the summed gates (B, 4D) and of c (B, D) from those of h and c' (B, D),
// given lstm_forward's activations (B, 5D) and c
std::tuple<at::Tensor, at::Tensor> lstm_backward(const at::Tensor& grad_h, const at::Tensor& grad_c,
                                                 const at::Tensor& acts, const at::Tensor& c) {
  for (const at::Tensor* t : {&grad_h, &grad_c, &acts, &c}) check(*t, "lstm_backward", "each input", 2);
  const int64_t b = c.size(0), d = c.size(1);
  TORCH_CHECK(grad_h.sizes() == c.sizes() && grad_c.sizes() == c.sizes() &&
                  acts.sizes() == at::IntArrayRef({b, 5 * d}),
              "aligndraw_step.lstm_backward: grad_h, grad_c and c must be (B, D) and acts (B, 5D), got ",
              grad_h.sizes(), ", ", grad_c.sizes(), ", ", c.sizes(), " and ", acts.sizes());
  const at::Tensor gh = grad_h.contiguous(), gc = grad_c.contiguous(), ac = acts.contiguous(),
                   cc = c.contiguous();
  at::Tensor grad_gates = at::empty({b, 4 * d}, c.options()), grad_prev = at::empty({b, d}, c.options());
  const float *ghp = gh.data_ptr<float>(), *gcp = gc.data_ptr<float>(), *ap = ac.data_ptr<float>(),
              *cp = cc.data_ptr<float>();
  float *gp = grad_gates.data_ptr<float>(), *pp = grad_prev.data_ptr<float>();
  const int64_t w = Vec::size();
  const Vec one(1.f);
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      for (int64_t j = 0; j < d; j += w) {
        const int64_t k = std::min(w, d - j);
        const float* row = ap + r * 5 * d + j;
        const Vec i = Vec::loadu(row, k), f = Vec::loadu(row + d, k), g = Vec::loadu(row + 2 * d, k),
                  o = Vec::loadu(row + 3 * d, k), tc = Vec::loadu(row + 4 * d, k);
        const Vec dh = Vec::loadu(ghp + r * d + j, k);
        const Vec dc = Vec::loadu(gcp + r * d + j, k) + dh * o * (one - tc * tc);
        float* out = gp + r * 4 * d + j;
        (dc * g * i * (one - i)).store(out, k);
        (dc * Vec::loadu(cp + r * d + j, k) * f * (one - f)).store(out + d, k);
        (dc * i * (one - g * g)).store(out + 2 * d, k);
        (dh * tc * o * (one - o)).store(out + 3 * d, k);
        (dc * f).store(pp + r * d + j, k);
      }
    }
  });
  return {grad_gates, grad_prev};
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

// One axis's filterbank rows for one window: F[i, a] = e_ia / (Σ_a e_ia + eps) with
// e_ia = exp(u_ia), u_ia = −(a − μ_i)²/(2σ²), μ_i = g + (i − N/2 − 0.5)·δ, a = 1..size; e = 0
// where u < flush (no subnormal weights; a NaN stays NaN). f: (n, size) of the output.
void filterbank_rows(float* f, float g, float delta, float sigma2, int64_t n, int64_t size,
                     double eps, double flush) {
  const float coef = -0.5f / sigma2, lo = static_cast<float>(flush);
  const int64_t w = Vec::size();
  for (int64_t i = 0; i < n; ++i) {
    const float mu = g + (static_cast<float>(i + 1) - n / 2.f - 0.5f) * delta;
    float* row = f + i * size;
    Vec total(0.f);
    for (int64_t a = 0; a < size; a += w) {
      const int64_t k = std::min(w, size - a);
      const Vec d = Vec::arange(static_cast<float>(a + 1), 1.f) - Vec(mu);
      const Vec u = d * d * Vec(coef), dropped = u < Vec(lo);
      // exp(0) in the dropped lanes, then 0: exp(u) there would be subnormal, which is slow
      const Vec e = Vec::blendv(Vec::blendv(u, Vec(0.f), dropped).exp(), Vec(0.f), dropped);
      e.store(row + a, k);
      total = total + Vec::set(Vec(0.f), e, k);
    }
    const Vec denom(at::vec::vec_reduce_all<float>(std::plus<Vec>(), total) + static_cast<float>(eps));
    for (int64_t a = 0; a < size; a += w) {
      const int64_t k = std::min(w, size - a);
      (Vec::loadu(row + a, k) / denom).store(row + a, k);
    }
  }
}

// The gradients of one window's filterbank rows f (n, size) with respect to g, δ and log σ²,
// from the loss's gradient gf (n, size): with q_i = Σ_a gf_ia·f_ia, the exponents' gradient is
// du_ia = f_ia·(gf_ia − q_i) (the normalisation's), and u's derivatives are d/σ² in μ_i and
// d²/(2σ²) in log σ², with d = a − μ_i; μ_i = g + o_i·δ.
void filterbank_rows_backward(float* out, const float* gf, const float* f, float g, float delta,
                              float sigma2, int64_t n, int64_t size) {
  const int64_t w = Vec::size();
  float dg = 0.f, ddelta = 0.f, dsigma2 = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float offset = static_cast<float>(i + 1) - n / 2.f - 0.5f, mu = g + offset * delta;
    const float* grow = gf + i * size;
    const float* frow = f + i * size;
    Vec q(0.f);
    for (int64_t a = 0; a < size; a += w) {
      const int64_t k = std::min(w, size - a);
      q = q + Vec::loadu(grow + a, k) * Vec::loadu(frow + a, k);  // zero past the tail
    }
    const Vec qi(at::vec::vec_reduce_all<float>(std::plus<Vec>(), q));
    Vec s1(0.f), s2(0.f);
    for (int64_t a = 0; a < size; a += w) {
      const int64_t k = std::min(w, size - a);
      const Vec du = Vec::loadu(frow + a, k) * (Vec::loadu(grow + a, k) - qi);  // zero past the tail
      const Vec d = Vec::arange(static_cast<float>(a + 1), 1.f) - Vec(mu);
      const Vec dud = du * d;
      s1 = s1 + dud;
      s2 = s2 + dud * d;
    }
    const float dmu = at::vec::vec_reduce_all<float>(std::plus<Vec>(), s1) / sigma2;
    dg += dmu;
    ddelta += dmu * offset;
    dsigma2 += at::vec::vec_reduce_all<float>(std::plus<Vec>(), s2);
  }
  out[0] = dg;
  out[1] = ddelta;
  out[2] = dsigma2 * 0.5f / sigma2;  // log σ²'s: σ²·d²/(2σ⁴), without σ⁴, which underflows for tiny σ²
}

// The posterior's sample and its KL divergence from the prior, one image's Z values at a time.
// post: μ_q, log σ_q (2Z); prior: the prior's pre-activations (2Z), μ_p, log σ_p = tanh of
// them, or nullptr for N(0, I) (the first step); eps: ε (Z).
struct Latent {
  const float *post, *prior, *eps;
  int64_t z;

  // μ_q, log σ_q, μ_p, log σ_p at columns j..j+k
  void load(int64_t j, int64_t k, Vec& mu_q, Vec& ls_q, Vec& mu_p, Vec& ls_p) const {
    mu_q = Vec::loadu(post + j, k);
    ls_q = Vec::loadu(post + z + j, k);
    mu_p = prior ? tanh_of(Vec::loadu(prior + j, k)) : Vec(0.f);
    ls_p = prior ? tanh_of(Vec::loadu(prior + z + j, k)) : Vec(0.f);
  }
};

struct LatentRows {
  at::Tensor post, prior, eps;
  int64_t b, z;

  LatentRows(const at::Tensor& post_in, const std::optional<at::Tensor>& prior_in,
             const at::Tensor& eps_in, const char* op) {
    check(post_in, op, "post", 2);
    check(eps_in, op, "eps", 2);
    b = eps_in.size(0);
    z = eps_in.size(1);
    TORCH_CHECK(post_in.size(0) == b && post_in.size(1) == 2 * z, "aligndraw_step.", op, ": post must "
                "be (B, 2Z) = (", b, ", ", 2 * z, ") for eps ", eps_in.sizes(), ", got ", post_in.sizes());
    post = rows(post_in);
    eps = rows(eps_in);
    if (prior_in.has_value()) {
      check(*prior_in, op, "prior", 2);
      TORCH_CHECK(prior_in->sizes() == post_in.sizes(), "aligndraw_step.", op, ": prior must be (B, 2Z) "
                  "like post, got ", prior_in->sizes(), " and ", post_in.sizes());
      prior = rows(*prior_in);
    }
  }
  Latent row(int64_t r) const {
    return {post.data_ptr<float>() + r * post.stride(0),
            prior.defined() ? prior.data_ptr<float>() + r * prior.stride(0) : nullptr,
            eps.data_ptr<float>() + r * eps.stride(0), z};
  }
};

// z = μ_q + e^(log σ_q)·ε (B, Z) and KL(q ‖ p) (B,), as aligndraw.losses.gaussian_kl
std::tuple<at::Tensor, at::Tensor> posterior_kl(const at::Tensor& post,
                                                const std::optional<at::Tensor>& prior,
                                                const at::Tensor& eps) {
  const LatentRows in(post, prior, eps, "posterior_kl");
  at::Tensor z = at::empty({in.b, in.z}, eps.options()), kl = at::empty({in.b}, eps.options());
  float *zp = z.data_ptr<float>(), *kp = kl.data_ptr<float>();
  const int64_t w = Vec::size();
  at::parallel_for(0, in.b, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const Latent x = in.row(r);
      Vec total(0.f);
      for (int64_t j = 0; j < in.z; j += w) {
        const int64_t k = std::min(w, in.z - j);
        Vec mu_q, ls_q, mu_p, ls_p;
        x.load(j, k, mu_q, ls_q, mu_p, ls_p);
        (mu_q + ls_q.exp() * Vec::loadu(x.eps + j, k)).store(zp + r * in.z + j, k);
        const Vec gap = mu_q - mu_p;
        const Vec term = Vec(2.f) * (ls_p - ls_q) + (Vec(2.f) * (ls_q - ls_p)).exp() +
                         gap * gap * (Vec(-2.f) * ls_p).exp() - Vec(1.f);
        total = total + Vec::set(Vec(0.f), term, k);
      }
      kp[r] = 0.5f * at::vec::vec_reduce_all<float>(std::plus<Vec>(), total);
    }
  });
  return {z, kl};
}

// The gradients of post (B, 2Z) and of the prior's pre-activations (B, 2Z; (0,) without a
// prior) from those of z (B, Z) and of the KL (B,)
std::tuple<at::Tensor, at::Tensor> posterior_kl_backward(const at::Tensor& grad_z,
                                                         const at::Tensor& grad_kl,
                                                         const at::Tensor& post,
                                                         const std::optional<at::Tensor>& prior,
                                                         const at::Tensor& eps) {
  const LatentRows in(post, prior, eps, "posterior_kl_backward");
  check(grad_z, "posterior_kl_backward", "grad_z", 2);
  check(grad_kl, "posterior_kl_backward", "grad_kl", 1);
  TORCH_CHECK(grad_z.sizes() == eps.sizes() && grad_kl.size(0) == in.b, "aligndraw_step.posterior_kl_backward: "
              "grad_z must be (B, Z) like eps and grad_kl (B,), got ", grad_z.sizes(), " and ", grad_kl.sizes());
  const at::Tensor gz = grad_z.contiguous(), gk = grad_kl.contiguous();
  at::Tensor grad_post = at::empty({in.b, 2 * in.z}, eps.options());
  at::Tensor grad_prior = at::empty({in.prior.defined() ? in.b : 0, 2 * in.z}, eps.options());
  const float *gzp = gz.data_ptr<float>(), *gkp = gk.data_ptr<float>();
  float *pp = grad_post.data_ptr<float>(), *qp = in.prior.defined() ? grad_prior.data_ptr<float>() : nullptr;
  const int64_t w = Vec::size(), z = in.z;
  const Vec one(1.f);
  at::parallel_for(0, in.b, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const Latent x = in.row(r);
      const Vec dkl(gkp[r]);
      for (int64_t j = 0; j < z; j += w) {
        const int64_t k = std::min(w, z - j);
        Vec mu_q, ls_q, mu_p, ls_p;
        x.load(j, k, mu_q, ls_q, mu_p, ls_p);
        const Vec dz = Vec::loadu(gzp + r * z + j, k);
        const Vec gap = mu_q - mu_p, inv_var_p = (Vec(-2.f) * ls_p).exp();
        const Vec ratio = (Vec(2.f) * (ls_q - ls_p)).exp(), mean_term = gap * gap * inv_var_p;
        const Vec d_mean = dkl * gap * inv_var_p;  // ∂KL/∂μ_q = −∂KL/∂μ_p
        (dz + d_mean).store(pp + r * 2 * z + j, k);
        (dz * ls_q.exp() * Vec::loadu(x.eps + j, k) + dkl * (ratio - one)).store(pp + r * 2 * z + z + j, k);
        if (qp) {
          (d_mean.neg() * (one - mu_p * mu_p)).store(qp + r * 2 * z + j, k);
          (dkl * (one - ratio - mean_term) * (one - ls_p * ls_p)).store(qp + r * 2 * z + z + j, k);
        }
      }
    }
  });
  return {grad_post, grad_prior};
}

// A window's numbers from its five raw ones (g̃_x, g̃_y, log σ², log δ̃, log γ), as
// aligndraw.attention.window_params computes them in fp32
struct Window {
  float g_x, g_y, delta, sigma2, gamma;
};

struct Grid {
  int64_t height, width, n;
  float half_w, half_h, stride;  // (W + 1)/2, (H + 1)/2, (max(H, W) − 1)/(N − 1)
  Grid(int64_t h, int64_t w, int64_t grid)
      : height(h), width(w), n(grid), half_w(static_cast<float>((w + 1) / 2.0)),
        half_h(static_cast<float>((h + 1) / 2.0)),
        stride(static_cast<float>((std::max(h, w) - 1) / static_cast<double>(grid - 1))) {}
  Window window(const float* p) const {
    return {half_w * (p[0] + 1.f), half_h * (p[1] + 1.f), stride * std::exp(p[3]), std::exp(p[2]),
            std::exp(p[4])};
  }
};

// The windows' raw numbers: each tensor (B_k, 5) with dense rows, as rows of one list
struct Params {
  std::vector<at::Tensor> kept;
  std::vector<const float*> row;  // R pointers

  Params(const std::vector<at::Tensor>& params, const char* op) {
    TORCH_CHECK(!params.empty(), "aligndraw_step.", op, ": needs at least one tensor of windows");
    for (const at::Tensor& p : params) {
      check(p, op, "each tensor of windows' numbers", 2);
      TORCH_CHECK(p.size(1) == 5, "aligndraw_step.", op, ": each tensor of windows' numbers must be "
                  "(B, 5) (g̃_x, g̃_y, log σ², log δ̃, log γ), got ", p.sizes());
      kept.push_back(rows(p));
      const float* base = kept.back().data_ptr<float>();
      for (int64_t i = 0; i < p.size(0); ++i) row.push_back(base + i * kept.back().stride(0));
    }
  }
  int64_t size() const { return static_cast<int64_t>(row.size()); }
};

void check_grid(int64_t height, int64_t width, int64_t n, const char* op) {
  TORCH_CHECK(height > 0 && width > 0 && n >= 2, "aligndraw_step.", op, ": height and width must be "
              "positive and n at least 2, got ", height, ", ", width, " and ", n);
}

// params: each (B_k, 5) → γ (R,), F_x (R, n, W), F_y (R, n, H) for the R = Σ B_k windows in
// order, as aligndraw.attention.window_params and filterbanks give them
std::tuple<at::Tensor, at::Tensor, at::Tensor> attend(const std::vector<at::Tensor>& params,
                                                      int64_t height, int64_t width, int64_t n,
                                                      double eps, double flush) {
  check_grid(height, width, n, "attend");
  const Params p(params, "attend");
  const Grid grid(height, width, n);
  const int64_t r = p.size();
  const auto options = params[0].options();
  at::Tensor gamma = at::empty({r}, options), f_x = at::empty({r, n, width}, options),
             f_y = at::empty({r, n, height}, options);
  float *gp = gamma.data_ptr<float>(), *xp = f_x.data_ptr<float>(), *yp = f_y.data_ptr<float>();
  at::parallel_for(0, r, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Window w = grid.window(p.row[i]);
      gp[i] = w.gamma;
      filterbank_rows(xp + i * n * width, w.g_x, w.delta, w.sigma2, n, width, eps, flush);
      filterbank_rows(yp + i * n * height, w.g_y, w.delta, w.sigma2, n, height, eps, flush);
    }
  });
  return {gamma, f_x, f_y};
}

// The gradient of the windows' raw numbers (R, 5) from those of γ (R,), F_x and F_y, given
// attend's F_x and F_y and its params
at::Tensor attend_backward(const at::Tensor& grad_gamma, const at::Tensor& grad_x,
                           const at::Tensor& grad_y, const at::Tensor& f_x, const at::Tensor& f_y,
                           const std::vector<at::Tensor>& params, int64_t height, int64_t width) {
  check(grad_gamma, "attend_backward", "grad_gamma", 1);
  for (const at::Tensor* t : {&grad_x, &grad_y, &f_x, &f_y}) check(*t, "attend_backward", "each filterbank and its gradient", 3);
  const Params p(params, "attend_backward");
  const int64_t r = p.size(), n = f_x.size(1);
  check_grid(height, width, n, "attend_backward");
  TORCH_CHECK(grad_gamma.size(0) == r && f_x.sizes() == at::IntArrayRef({r, n, width}) &&
                  grad_x.sizes() == f_x.sizes() && f_y.sizes() == at::IntArrayRef({r, n, height}) &&
                  grad_y.sizes() == f_y.sizes(),
              "aligndraw_step.attend_backward: for R = ", r, " windows, n = ", n, " and a ", height, "×",
              width, " image the gradients and filterbanks must be γ (R,), F_x (R, n, W), F_y (R, n, H); got ",
              grad_gamma.sizes(), ", ", grad_x.sizes(), ", ", grad_y.sizes(), ", ", f_x.sizes(), ", ",
              f_y.sizes());
  const at::Tensor gg = grad_gamma.contiguous(), gx = grad_x.contiguous(), gy = grad_y.contiguous(),
                   fx = f_x.contiguous(), fy = f_y.contiguous();
  const Grid grid(height, width, n);
  at::Tensor out = at::empty({r, 5}, f_x.options());
  const float *ggp = gg.data_ptr<float>(), *gxp = gx.data_ptr<float>(), *gyp = gy.data_ptr<float>(),
              *fxp = fx.data_ptr<float>(), *fyp = fy.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, r, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Window w = grid.window(p.row[i]);
      float dx[3], dy[3];  // (g, δ, σ²) along x and along y
      filterbank_rows_backward(dx, gxp + i * n * width, fxp + i * n * width, w.g_x, w.delta, w.sigma2, n, width);
      filterbank_rows_backward(dy, gyp + i * n * height, fyp + i * n * height, w.g_y, w.delta, w.sigma2, n, height);
      float* o = op + i * 5;
      o[0] = grid.half_w * dx[0];
      o[1] = grid.half_h * dy[0];
      o[2] = dx[2] + dy[2];
      o[3] = (dx[1] + dy[1]) * w.delta;
      o[4] = ggp[i] * w.gamma;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(aligndraw_step, m) {
  m.def("context(Tensor factors, Tensor query2, float bound, Tensor v, Tensor mask, Tensor values) -> (Tensor, Tensor)");
  m.def("scores(Tensor factors, Tensor query2, float bound, Tensor v) -> Tensor");
  m.def("scores_backward(Tensor grad, Tensor factors, Tensor query2, float bound, Tensor v) -> (Tensor, Tensor, Tensor)");
  m.def("lstm(Tensor[] parts, Tensor c) -> (Tensor, Tensor)");
  m.def("lstm_forward(Tensor[] parts, Tensor c) -> (Tensor, Tensor, Tensor)");
  m.def("lstm_backward(Tensor grad_h, Tensor grad_c, Tensor acts, Tensor c) -> (Tensor, Tensor)");
  m.def("prior_sample(Tensor pre, Tensor eps) -> Tensor");
  m.def("posterior_kl(Tensor post, Tensor? prior, Tensor eps) -> (Tensor, Tensor)");
  m.def("posterior_kl_backward(Tensor grad_z, Tensor grad_kl, Tensor post, Tensor? prior, Tensor eps) -> (Tensor, Tensor)");
  m.def("attend(Tensor[] params, int height, int width, int n, float eps, float flush) -> (Tensor, Tensor, Tensor)");
  m.def("attend_backward(Tensor grad_gamma, Tensor grad_x, Tensor grad_y, Tensor f_x, Tensor f_y, Tensor[] params, int height, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(aligndraw_step, CPU, m) {
  m.impl("context", &context);
  m.impl("scores", &scores);
  m.impl("scores_backward", &scores_backward);
  m.impl("lstm", &lstm);
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
  m.impl("prior_sample", &prior_sample);
  m.impl("posterior_kl", &posterior_kl);
  m.impl("posterior_kl_backward", &posterior_kl_backward);
  m.impl("attend", &attend);
  m.impl("attend_backward", &attend_backward);
}
