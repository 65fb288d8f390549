// Batch-invariant linear layer: y = x wᵀ where every output element is
// summed in one fixed order that depends only on the reduction length, never
// on how many rows x has, which rows sit beside it, the thread count or the
// CPU's vector width. Decoding uses it so that a request's tokens do not
// depend on which other requests share its batch (BLAS kernels pick their
// blocking, and so their rounding, by the row count).
#ifndef LATHE_TENSOR_INVARIANT_LINEAR_H_
#define LATHE_TENSOR_INVARIANT_LINEAR_H_

#include <ATen/core/Tensor.h>

#include <optional>

namespace lathe::runtime {

// The implementations of the one summation order (identical results).
enum class InvariantKernel { kPortable, kAvx2, kAvx512 };
bool InvariantKernelSupported(InvariantKernel kernel);

// x [M, K], w [N, K] (float32, CPU) → [M, N], with `kernel` or the fastest
// this CPU has. On CUDA: one fixed-shape GEMM per block of 16 rows, so the
// kernel (and its summation order) does not change with M (docs/sampling.md
// says what that guarantees). Other dtypes on the CPU fall back to at::mm on
// rows padded to a multiple of 16 (no invariance promise).
at::Tensor InvariantLinear(const at::Tensor& x, const at::Tensor& w,
                           std::optional<InvariantKernel> kernel = std::nullopt);

}  // namespace lathe::runtime

#endif  // LATHE_TENSOR_INVARIANT_LINEAR_H_
