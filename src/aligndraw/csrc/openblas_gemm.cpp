// fp32 matrix products through OpenBLAS's sgemm, split by output rows or columns over PyTorch's
// own (OpenMP) threads: each thread multiplies its block with OpenBLAS on one thread, so
// OpenBLAS's thread pool never runs beside PyTorch's. Loaded by aligndraw/openblas.py, which
// finds the sgemm (numpy's OpenBLAS) and hands its address to bind(), after setting that
// OpenBLAS to one thread for the process.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>

namespace {

// cblas_sgemm with 64-bit (ILP64) or 32-bit integers
using Sgemm64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                         const float*, int64_t, float, float*, int64_t);
using Sgemm32 = void (*)(int, int, int, int, int, int, float, const float*, int, const float*,
                         int, float, float*, int);

Sgemm64 sgemm64 = nullptr;
Sgemm32 sgemm32 = nullptr;

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr int64_t kMinBlock = 64;  // no thread gets fewer output rows or columns than this
constexpr int64_t kAlign = 16;     // row and column blocks start at multiples of this

void bind(int64_t sgemm, bool ilp64) {
  sgemm64 = ilp64 ? reinterpret_cast<Sgemm64>(sgemm) : nullptr;
  sgemm32 = ilp64 ? nullptr : reinterpret_cast<Sgemm32>(sgemm);
}

bool bound() { return sgemm64 != nullptr || sgemm32 != nullptr; }

// A matrix as sgemm reads it: row-major (rows ld apart) or, transposed, column-major.
struct Operand {
  at::Tensor tensor;  // keeps a packed copy alive
  const float* data;
  int64_t ld;
  bool trans;
};

// The layout sgemm can read a (rows, cols) matrix in from its strides, if any: row-major
// (rows ld apart) or column-major; sizes of 1 admit any stride.
std::optional<std::pair<int64_t, bool>> layout(int64_t rows, int64_t cols, int64_t s0, int64_t s1) {
  if ((s1 == 1 || cols == 1) && (s0 >= std::max<int64_t>(1, cols) || rows == 1))
    return std::make_pair(std::max<int64_t>({1, cols, rows == 1 ? 1 : s0}), false);
  if ((s0 == 1 || rows == 1) && (s1 >= std::max<int64_t>(1, rows) || cols == 1))
    return std::make_pair(std::max<int64_t>({1, rows, cols == 1 ? 1 : s1}), true);
  return std::nullopt;
}

// Dimensions d and d + 1 of t as the matrix sgemm reads: in place where layout() allows,
// else from a packed copy (kept alive by the Operand)
Operand matrix(const at::Tensor& t, int64_t d) {
  if (auto l = layout(t.size(d), t.size(d + 1), t.stride(d), t.stride(d + 1)))
    return {t, t.data_ptr<float>(), l->first, l->second};
  at::Tensor packed = t.contiguous();  // any other layout: packed once
  return {packed, packed.data_ptr<float>(), std::max<int64_t>(1, t.size(d + 1)), false};
}

Operand operand(const at::Tensor& t) { return matrix(t, 0); }

// Rows [m0, m0 + m) and columns [n0, n0 + n) of c (ldc floats a row) = a b (+ beta c).
void sgemm(const Operand& a, const Operand& b, int64_t m0, int64_t m, int64_t n0, int64_t n,
           int64_t k, float beta, float* c, int64_t ldc) {
  const float* a0 = a.data + (a.trans ? m0 : m0 * a.ld);  // row m0 of a
  const float* b0 = b.data + (b.trans ? n0 * b.ld : n0);  // column n0 of b
  float* c0 = c + m0 * ldc + n0;
  const int ta = a.trans ? kTrans : kNoTrans, tb = b.trans ? kTrans : kNoTrans;
  if (sgemm64) {
    sgemm64(kRowMajor, ta, tb, m, n, k, 1.0f, a0, a.ld, b0, b.ld, beta, c0, ldc);
  } else {
    sgemm32(kRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
            1.0f, a0, static_cast<int>(a.ld), b0, static_cast<int>(b.ld), beta, c0,
            static_cast<int>(ldc));
  }
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat,
              "aligndraw_openblas: ", name, " must be a CPU float32 tensor, got ",
              t.scalar_type(), " on ", t.device());
}

// (M, K) @ (K, N) (+ bias (N,)) → (M, N), row-major
at::Tensor product(const std::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(bound(), "aligndraw_openblas: no sgemm bound (aligndraw.openblas.load() binds it)");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0),
              "aligndraw_openblas: expected (M, K) and (K, N) matrices, got ", a.sizes(), " and ",
              b.sizes());
  check(a, "a");
  check(b, "b");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  TORCH_CHECK(!sgemm32 || std::max({m, n, k, a.numel(), b.numel(), m * n}) <= INT32_MAX,
              "aligndraw_openblas: a product this large needs a 64-bit-integer OpenBLAS");
  at::Tensor c;
  if (bias.has_value()) {
    check(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "aligndraw_openblas: bias must be (",
                n, "), got ", bias->sizes());
    c = at::empty({m, n}, a.options());
    c.copy_(bias->expand({m, n}));  // a copy (never a view of bias): sgemm adds to it (beta = 1)
  } else {
    c = at::empty({m, n}, a.options());
  }
  if (m == 0 || n == 0) return c;
  if (k == 0) return bias.has_value() ? c : c.zero_();
  const Operand oa = operand(a), ob = operand(b);
  TORCH_CHECK(!sgemm32 || std::max(oa.ld, ob.ld) <= INT32_MAX,
              "aligndraw_openblas: a row stride this large needs a 64-bit-integer OpenBLAS");
  const float beta = bias.has_value() ? 1.0f : 0.0f;
  float* out = c.data_ptr<float>();
  // Each thread's sgemm packs all of the operand that is not split: split by columns, every
  // thread packs all of a (M·K floats); by rows, all of b (K·N). So the longer side is split,
  // into at most extent / kMinBlock blocks: none is empty, even rounded down to kAlign.
  const bool by_rows = m > n;
  const int64_t extent = by_rows ? m : n;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), extent / kMinBlock));
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t e0 = i == 0 ? 0 : extent * i / chunks / kAlign * kAlign;
      const int64_t e1 = i + 1 == chunks ? extent : extent * (i + 1) / chunks / kAlign * kAlign;
      const int64_t m0 = by_rows ? e0 : 0, rows = by_rows ? e1 - e0 : m;
      const int64_t n0 = by_rows ? 0 : e0, cols = by_rows ? n : e1 - e0;
      sgemm(oa, ob, m0, rows, n0, cols, k, beta, out, n);
    }
  });
  return c;
}

at::Tensor addmm(const std::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b) {
  return product(bias, a, b);
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) { return product(std::nullopt, a, b); }

// aᵀ b: (R, M), (R, N) → (M, N), e.g. a weight's gradient from R rows of gradients and inputs
at::Tensor tmm(const at::Tensor& a, const at::Tensor& b) { return product(std::nullopt, a.t(), b); }

// A stack of matrices (P, R, C): matrix i starts i·step floats after data, each read as Operand.
struct Stack {
  Operand matrix;
  int64_t step;
};

Stack stack(const at::Tensor& t) {
  Operand first = matrix(t, 1);
  return {first, first.tensor.stride(0)};  // t's batch stride, or the packed copy's
}

// (P, M, K) @ (P, K, N) (+ c (P, M, N)) → (P, M, N), row-major: the P products split over
// PyTorch's threads, each thread calling OpenBLAS (one thread) for each of its matrices
at::Tensor batched(const std::optional<at::Tensor>& c, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(bound(), "aligndraw_openblas: no sgemm bound (aligndraw.openblas.load() binds it)");
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1),
              "aligndraw_openblas: expected (P, M, K) and (P, K, N) stacks, got ", a.sizes(),
              " and ", b.sizes());
  check(a, "a");
  check(b, "b");
  const int64_t p = a.size(0), m = a.size(1), k = a.size(2), n = b.size(2);
  TORCH_CHECK(!sgemm32 || std::max({m, n, k, m * n, m * k, k * n}) <= INT32_MAX,
              "aligndraw_openblas: a product this large needs a 64-bit-integer OpenBLAS");
  at::Tensor out = at::empty({p, m, n}, a.options());
  if (c.has_value()) {
    check(*c, "c");
    TORCH_CHECK(c->dim() == 3 && c->size(0) == p && c->size(1) == m && c->size(2) == n,
                "aligndraw_openblas: c must be (", p, ", ", m, ", ", n, "), got ", c->sizes());
    out.copy_(*c);  // sgemm adds to it (beta = 1)
  }
  if (out.numel() == 0) return out;
  if (k == 0) return c.has_value() ? out : out.zero_();
  const Stack sa = stack(a), sb = stack(b);
  TORCH_CHECK(!sgemm32 || std::max(sa.matrix.ld, sb.matrix.ld) <= INT32_MAX,
              "aligndraw_openblas: a row stride this large needs a 64-bit-integer OpenBLAS");
  const float beta = c.has_value() ? 1.0f : 0.0f;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, p, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      // views of matrix i (no tensor held: sa and sb keep theirs alive)
      const Operand ai{at::Tensor(), sa.matrix.data + i * sa.step, sa.matrix.ld, sa.matrix.trans};
      const Operand bi{at::Tensor(), sb.matrix.data + i * sb.step, sb.matrix.ld, sb.matrix.trans};
      sgemm(ai, bi, 0, m, 0, n, k, beta, o + i * m * n, n);
    }
  });
  return out;
}

at::Tensor bmm(const at::Tensor& a, const at::Tensor& b) { return batched(std::nullopt, a, b); }

at::Tensor baddbmm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  return batched(c, a, b);
}

}  // namespace

TORCH_LIBRARY(aligndraw_openblas, m) {
  m.def("bind(int sgemm, bool ilp64) -> ()", &bind);
  m.def("addmm(Tensor? bias, Tensor a, Tensor b) -> Tensor");
  m.def("mm(Tensor a, Tensor b) -> Tensor");
  m.def("tmm(Tensor a, Tensor b) -> Tensor");
  m.def("bmm(Tensor a, Tensor b) -> Tensor");
  m.def("baddbmm(Tensor c, Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(aligndraw_openblas, CPU, m) {
  m.impl("addmm", &addmm);
  m.impl("mm", &mm);
  m.impl("tmm", &tmm);
  m.impl("bmm", &bmm);
  m.impl("baddbmm", &baddbmm);
}
