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

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_RECOMPUTE_H_
