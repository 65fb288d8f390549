// The fixed summation order of InvariantLinear, for output (m, n) over K:
//   lane l (0..15) sums x[m,k]·w[n,k] for k ≡ l (mod 16), k < 16⌊K/16⌋, in
//   increasing k; the lanes fold pairwise (l += l+8, then +4, +2, +1); the
//   last K mod 16 products are added to lane 0 in increasing k.
// Products and sums are separate roundings (this file builds with
// -ffp-contract=off), so the order, and the result, is the same on every x86
// vector width; blocks of rows only reuse loads, never change the order.
#include "runtime/invariant_linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace lathe::runtime {
namespace {

constexpr int kLanes = 16;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LATHE_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LATHE_VECTOR_CLONES
#endif

// 16 lanes of float in one value; GCC lowers it to whatever vector width
// the clone targets, lane by lane, so the arithmetic stays the same.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline __attribute__((always_inline)) Lanes Load(const float* p) {
  Lanes v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline float Fold(const Lanes& v) {
  float acc[kLanes];
  __builtin_memcpy(acc, &v, sizeof(acc));
  for (int s = kLanes / 2; s > 0; s /= 2) {
    for (int l = 0; l < s; ++l) acc[l] = acc[l] + acc[l + s];
  }
  return acc[0];
}

// MB rows of x against NB rows of w.
template <int MB, int NB>
inline __attribute__((always_inline)) void Tile(const float* x, const float* w, int64_t k_dim, float* y,
                                                int64_t ldy) {
  const int64_t main = k_dim / kLanes * kLanes;
  Lanes acc[MB][NB] = {};
  for (int64_t k = 0; k < main; k += kLanes) {
    Lanes wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = Load(w + j * k_dim + k);
    for (int i = 0; i < MB; ++i) {
      const Lanes xv = Load(x + i * k_dim + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = acc[i][j] + xv * wv[j];
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) {
      float t = Fold(acc[i][j]);
      for (int64_t k = main; k < k_dim; ++k) t = t + x[i * k_dim + k] * w[j * k_dim + k];
      y[i * ldy + j] = t;
    }
  }
}

// Rows [n0, n1) of w against every row of x; y is [M, N].
LATHE_VECTOR_CLONES
void Columns(const float* x, int64_t m_dim, const float* w, int64_t n_dim, int64_t n0, int64_t n1, int64_t k_dim,
             float* y) {
  constexpr int kMb = 4, kNb = 4;
  int64_t n = n0;
  for (; n + kNb <= n1; n += kNb) {
    int64_t m = 0;
    for (; m + kMb <= m_dim; m += kMb) Tile<kMb, kNb>(x + m * k_dim, w + n * k_dim, k_dim, y + m * n_dim + n, n_dim);
    for (; m < m_dim; ++m) Tile<1, kNb>(x + m * k_dim, w + n * k_dim, k_dim, y + m * n_dim + n, n_dim);
  }
  for (; n < n1; ++n) {
    for (int64_t m = 0; m < m_dim; ++m) Tile<1, 1>(x + m * k_dim, w + n * k_dim, k_dim, y + m * n_dim + n, n_dim);
  }
}

}  // namespace

at::Tensor InvariantLinear(const at::Tensor& x, const at::Tensor& w) {
  const int64_t m_dim = x.size(0), n_dim = w.size(0), k_dim = x.size(1);
  if (x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat || !x.device().is_cpu() ||
      !w.device().is_cpu()) {
    const int64_t padded = std::max<int64_t>(16, (m_dim + 15) / 16 * 16);
    at::Tensor xp = padded == m_dim ? x : at::constant_pad_nd(x, {0, 0, 0, padded - m_dim});
    return at::mm(xp, w.t()).narrow(0, 0, m_dim);
  }
  TORCH_CHECK(w.size(1) == k_dim, "InvariantLinear: x is [", m_dim, ", ", k_dim, "] but w is ", w.sizes());
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty({m_dim, n_dim}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Threads split w's rows in multiples of the tile width; the order inside
  // an output element does not depend on the split.
  const int64_t blocks = (n_dim + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k_dim * std::max<int64_t>(1, m_dim)));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    Columns(xp, m_dim, wp, n_dim, b0 * 4, std::min(n_dim, b1 * 4), k_dim, yp);
  });
  return y;
}

}  // namespace lathe::runtime
