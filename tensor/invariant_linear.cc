// The fixed summation order of InvariantLinear, for output (m, n) over K:
//   lane l (0..15) accumulates x[m,k]·w[n,k] for k ≡ l (mod 16),
//   k < 16⌊K/16⌋, in increasing k, each step one fused multiply-add; the
//   lanes fold pairwise (l += l+8, then +4, +2, +1); the last K mod 16
//   products are fused into lane 0 in increasing k.
// Three implementations of that one order — AVX-512, AVX2+FMA and portable
// (std::fma per lane) — give identical bits; the CPU picks one at start.
// Blocks of rows only reuse loads, never change the order. This file builds
// with -ffp-contract=off so the compiler adds no fusing of its own.
#include "tensor/invariant_linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LATHE_X86 1
#endif

namespace lathe::runtime {
namespace {

constexpr int kLanes = 16;

inline float Fold(float* acc) {
  for (int s = kLanes / 2; s > 0; s /= 2) {
    for (int l = 0; l < s; ++l) acc[l] = acc[l] + acc[l + s];
  }
  return acc[0];
}

// Lane sums -> outputs: fold, then the tail.
template <int MB, int NB>
inline void Finish(float (&lanes)[MB][NB][kLanes], const float* x, const float* w, int64_t k_dim, int64_t main,
                   float* y, int64_t ldy) {
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) {
      float t = Fold(lanes[i][j]);
      for (int64_t k = main; k < k_dim; ++k) t = std::fma(x[i * k_dim + k], w[j * k_dim + k], t);
      y[i * ldy + j] = t;
    }
  }
}

struct Portable {
  // MB rows of x against NB rows of w.
  template <int MB, int NB>
  static void Tile(const float* x, const float* w, int64_t k_dim, float* y, int64_t ldy) {
    const int64_t main = k_dim / kLanes * kLanes;
    float acc[MB][NB][kLanes] = {};
    for (int64_t k = 0; k < main; k += kLanes) {
      for (int i = 0; i < MB; ++i) {
        for (int j = 0; j < NB; ++j) {
          const float* xr = x + i * k_dim + k;
          const float* wr = w + j * k_dim + k;
          for (int l = 0; l < kLanes; ++l) acc[i][j][l] = std::fma(xr[l], wr[l], acc[i][j][l]);
        }
      }
    }
    Finish<MB, NB>(acc, x, w, k_dim, main, y, ldy);
  }
};

#ifdef LATHE_X86
struct Avx512 {
  template <int MB, int NB>
  __attribute__((target("avx512f"))) static void Tile(const float* x, const float* w, int64_t k_dim, float* y,
                                                       int64_t ldy) {
    const int64_t main = k_dim / kLanes * kLanes;
    __m512 acc[MB][NB];
    for (int i = 0; i < MB; ++i) {
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < main; k += kLanes) {
      __m512 wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_ps(w + j * k_dim + k);
      for (int i = 0; i < MB; ++i) {
        const __m512 xv = _mm512_loadu_ps(x + i * k_dim + k);
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    }
    float lanes[MB][NB][kLanes];
    for (int i = 0; i < MB; ++i) {
      for (int j = 0; j < NB; ++j) _mm512_storeu_ps(lanes[i][j], acc[i][j]);
    }
    Finish<MB, NB>(lanes, x, w, k_dim, main, y, ldy);
  }
};

struct Avx2 {
  template <int MB, int NB>
  __attribute__((target("avx2,fma"))) static void Tile(const float* x, const float* w, int64_t k_dim, float* y,
                                                        int64_t ldy) {
    const int64_t main = k_dim / kLanes * kLanes;
    __m256 lo[MB][NB], hi[MB][NB];  // lanes 0-7 and 8-15
    for (int i = 0; i < MB; ++i) {
      for (int j = 0; j < NB; ++j) lo[i][j] = hi[i][j] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < main; k += kLanes) {
      for (int i = 0; i < MB; ++i) {
        const __m256 xl = _mm256_loadu_ps(x + i * k_dim + k), xh = _mm256_loadu_ps(x + i * k_dim + k + 8);
        for (int j = 0; j < NB; ++j) {
          lo[i][j] = _mm256_fmadd_ps(xl, _mm256_loadu_ps(w + j * k_dim + k), lo[i][j]);
          hi[i][j] = _mm256_fmadd_ps(xh, _mm256_loadu_ps(w + j * k_dim + k + 8), hi[i][j]);
        }
      }
    }
    float lanes[MB][NB][kLanes];
    for (int i = 0; i < MB; ++i) {
      for (int j = 0; j < NB; ++j) {
        _mm256_storeu_ps(lanes[i][j], lo[i][j]);
        _mm256_storeu_ps(lanes[i][j] + 8, hi[i][j]);
      }
    }
    Finish<MB, NB>(lanes, x, w, k_dim, main, y, ldy);
  }
};
#endif

// Rows [n0, n1) of w against every row of x; y is [M, N].
template <typename Arch, int kMb, int kNb>
void Columns(const float* x, int64_t m_dim, const float* w, int64_t n_dim, int64_t n0, int64_t n1, int64_t k_dim,
             float* y) {
  int64_t n = n0;
  for (; n + kNb <= n1; n += kNb) {
    int64_t m = 0;
    for (; m + kMb <= m_dim; m += kMb) {
      Arch::template Tile<kMb, kNb>(x + m * k_dim, w + n * k_dim, k_dim, y + m * n_dim + n, n_dim);
    }
    for (; m < m_dim; ++m) Arch::template Tile<1, kNb>(x + m * k_dim, w + n * k_dim, k_dim, y + m * n_dim + n, n_dim);
  }
  for (; n < n1; ++n) {
    for (int64_t m = 0; m < m_dim; ++m) {
      Arch::template Tile<1, 1>(x + m * k_dim, w + n * k_dim, k_dim, y + m * n_dim + n, n_dim);
    }
  }
}

using ColumnsFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*);

ColumnsFn ColumnsOf(InvariantKernel kernel) {
  switch (kernel) {
#ifdef LATHE_X86
    case InvariantKernel::kAvx512: return Columns<Avx512, 4, 4>;
    case InvariantKernel::kAvx2: return Columns<Avx2, 2, 2>;
#endif
    default: return Columns<Portable, 2, 4>;
  }
}

InvariantKernel Best() {
  for (InvariantKernel k : {InvariantKernel::kAvx512, InvariantKernel::kAvx2}) {
    if (InvariantKernelSupported(k)) return k;
  }
  return InvariantKernel::kPortable;
}

// CUDA: one GEMM per block of kCudaRows rows, every call [kCudaRows, K] x
// [K, N] whatever M is (the last block zero-padded). The library then picks
// one kernel, and so one summation order (split-K included), for every
// call: a row's result no longer follows the batch size, as it would with
// one [M, K] product. TF32 stays off (libtorch's default), so products are
// float32 throughout. See docs/sampling.md for what this guarantees.
constexpr int64_t kCudaRows = 16;

at::Tensor CudaBlocks(const at::Tensor& x, const at::Tensor& w) {
  const int64_t m_dim = x.size(0), blocks = (m_dim + kCudaRows - 1) / kCudaRows;
  at::Tensor xp = at::constant_pad_nd(x, {0, 0, 0, blocks * kCudaRows - m_dim});
  const at::Tensor wt = w.t();
  std::vector<at::Tensor> out;
  for (int64_t b = 0; b < blocks; ++b) out.push_back(at::mm(xp.narrow(0, b * kCudaRows, kCudaRows), wt));
  return at::cat(out, 0).narrow(0, 0, m_dim);
}

}  // namespace

bool InvariantKernelSupported(InvariantKernel kernel) {
  switch (kernel) {
    case InvariantKernel::kPortable: return true;
#ifdef LATHE_X86
    case InvariantKernel::kAvx512: return __builtin_cpu_supports("avx512f");
    case InvariantKernel::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    default: return false;
  }
}

at::Tensor InvariantLinear(const at::Tensor& x, const at::Tensor& w, std::optional<InvariantKernel> kernel) {
  const int64_t m_dim = x.size(0), n_dim = w.size(0), k_dim = x.size(1);
  if (x.is_cuda() && w.is_cuda()) return CudaBlocks(x, w);
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
  static const InvariantKernel best = Best();
  TORCH_CHECK(!kernel.has_value() || InvariantKernelSupported(*kernel), "this CPU lacks the requested kernel");
  const ColumnsFn columns = ColumnsOf(kernel.value_or(best));
  const int64_t blocks = (n_dim + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k_dim * std::max<int64_t>(1, m_dim)));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    columns(xp, m_dim, wp, n_dim, b0 * 4, std::min(n_dim, b1 * 4), k_dim, yp);
  });
  return y;
}

}  // namespace lathe::runtime
