// The training losses with Tinker's semantics: per-token elementwise losses
// whose plain sum (over tokens and datums, never a mean) is the loss.
#ifndef LATHE_RUNTIME_LOSSES_H_
#define LATHE_RUNTIME_LOSSES_H_

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <string>

#include "core/loss_spec.h"

namespace lathe::runtime {

// log_softmax(logits)[i, index[i, k]] for index [N, K] (no ignored entries).
using GatherLogprobsFn = std::function<at::Tensor(const at::Tensor& logits, const at::Tensor& index)>;

// Per-token log-probabilities of `targets` ([N] or [N, K] int64) under
// `logits` [N, V] (fp32); ignored targets give 0. Differentiable in logits.
// `gather` replaces the single-process log-softmax gather (e.g. by the
// vocabulary-parallel one).
at::Tensor TargetLogprobs(const at::Tensor& logits, const at::Tensor& targets,
                          const GatherLogprobsFn& gather = nullptr);

// Elementwise loss shaped like `logprobs`, zero at ignored targets; its sum is
// the datum's loss. `inputs` holds every loss_fn_input as a float or int64
// tensor; `config` holds the spec's defaults overridden by loss_fn_config.
// REQUIRES: inputs and config were validated against FindLoss(loss_fn), and
// `logprobs` and `inputs` cover one whole datum (gspo's sequence ratio is a
// mean over the datum's tokens).
at::Tensor ElementwiseLoss(const std::string& loss_fn, const at::Tensor& logprobs,
                           const std::map<std::string, at::Tensor>& inputs,
                           const std::map<std::string, double>& config);

// Whether each token's ElementwiseLoss depends on its own row of the inputs
// only, so that any rows' losses may be computed apart (all but gspo, whose
// ratio is a mean over the datum).
bool PerTokenLoss(const std::string& loss_fn);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_LOSSES_H_
