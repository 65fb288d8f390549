// A trainable tensor of the model, how its gradient is completed across
// ranks, and which part of the whole tensor a rank holds. Everything that is
// generic over the architecture (gradient sync, the optimizer, checkpoints,
// exports) works on these.
#ifndef LATHE_TENSOR_TRAINABLE_PARAM_H_
#define LATHE_TENSOR_TRAINABLE_PARAM_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace lathe::runtime {

// How the gradient of a trainable tensor is completed across ranks before
// the optimizer step, and which ranks count it in the global norm.
enum class GradSync {
  kReplicated,  // same value on every tp rank, full gradient on each
  kTpSharded,   // a disjoint part on each tp rank (shard_dim), full gradient
  kTpPartial,   // replicated, each tp rank holds part of the gradient (sum over tp)
  kKvShared,    // a KV head held by several tp ranks, each with part of its gradient
  kExpert,      // experts of this ep rank; sum over the expert-data group
};

// One trainable leaf tensor. A stacked expert tensor (per_expert) holds the
// experts of a layer along dim 0 and its name carries "{e}" where the expert
// index goes, so it expands into one Hugging Face / PEFT name per expert.
// Under model parallelism a rank holds [shard_begin, shard_begin +
// tensor.size(shard_dim)) of dimension shard_dim of a tensor of full_size
// along it (shard_dim -1: the whole tensor).
//
// `tensor` is always fp32: what the optimizer updates, checkpoints hold and
// exports write. Under bfloat16 a fully fine-tuned weight is read by the
// forward from `compute`, its bf16 copy (the autograd leaf): `tensor` is then
// its fp32 master copy, gradients are moved into tensor's fp32 gradient after
// each backward (FoldComputeGradients) and `compute` is rounded from it after
// each change (RefreshComputeCopies). Undefined `compute`: the forward reads
// `tensor` (fp32 runs, LoRA A/B).
struct TrainableParam {
  std::string name;
  at::Tensor tensor;
  bool per_expert = false;
  GradSync sync = GradSync::kReplicated;
  int shard_dim = -1;
  int64_t shard_begin = 0;
  int64_t full_size = 0;
  at::Tensor compute = at::Tensor();
};

// Adds each bf16 `compute` gradient to its master's fp32 gradient (defining
// it if needed) and clears it. Nothing to do in fp32 runs.
void FoldComputeGradients(std::vector<TrainableParam>& params);
// Rounds every master into its `compute` copy (after an optimizer step, a
// load). Nothing to do in fp32 runs.
void RefreshComputeCopies(std::vector<TrainableParam>& params);

// Calls fn(name, slice) for each named tensor `value` (shaped like p.tensor)
// holds; experts are named by their global index.
void ForEachNamed(const TrainableParam& p, const at::Tensor& value,
                  const std::function<void(const std::string&, const at::Tensor&)>& fn);

}  // namespace lathe::runtime

#endif  // LATHE_TENSOR_TRAINABLE_PARAM_H_
