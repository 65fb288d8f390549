// Trading compute for memory: a function whose intermediate tensors are not
// kept for the backward pass but computed again inside it.
#ifndef LATHE_RUNTIME_RECOMPUTE_H_
#define LATHE_RUNTIME_RECOMPUTE_H_

#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

namespace lathe::runtime {

using TensorFn = std::function<at::Tensor(const at::Tensor&)>;

// Returns fn(x). With grad mode on and x or a tensor of `params` requiring
// grad, the result is differentiable like fn(x) but the graph keeps only x
// (and fn): the backward runs fn(x) again with autograd and backpropagates
// through that copy, which adds into the .grad of every leaf fn reaches (the
// `params` it uses included) and yields x's gradient. `params` must hold the
// trainable leaves fn reads (only whether any requires grad matters).
//
// REQUIRES: fn is deterministic (the recomputed forward equals the first);
// fn's collectives run again in the backward, so every member of a group
// recomputes the same functions in the same order (as for any backward).
// With grad mode off: fn(x), nothing kept.
at::Tensor Recomputed(const TensorFn& fn, const at::Tensor& x, const std::vector<at::Tensor>& params);

// A scalar function of x's rows [begin, begin + n): fn(rows, begin).
using RowsLossFn = std::function<at::Tensor(const at::Tensor& rows, int64_t begin)>;

// Returns the sum over x's chunks of `chunk` rows of fn(chunk rows, begin),
// a scalar, with each chunk's backward run here, right after its forward:
// the gradients of x's rows and of the tensors of `params` that require
// grad are kept (the params' summed in fp32), every intermediate tensor of
// fn is freed, and the result's backward hands them on scaled by its
// incoming gradient. Saves the second forward Recomputed runs, for
// functions that end in their loss (a head and its per-token losses).
//
// REQUIRES: chunk > 0; fn returns a scalar and reads no trainable tensor
// outside `params` and x; fn's collectives run inside this call (every
// member of a group calls it with the same chunking). With grad mode off,
// or nothing requiring grad: the plain sum, nothing kept.
at::Tensor ChunkedBackwardNow(const RowsLossFn& fn, const at::Tensor& x, int64_t chunk,
                              const std::vector<at::Tensor>& params);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_RECOMPUTE_H_
