// Naming and the bf16 compute copies of trainable tensors.
#include "tensor/trainable_param.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace lathe::runtime {

void ForEachNamed(const TrainableParam& p, const at::Tensor& value,
                  const std::function<void(const std::string&, const at::Tensor&)>& fn) {
  if (!p.per_expert) {
    fn(p.name, value);
    return;
  }
  const int64_t first = p.shard_dim == 0 ? p.shard_begin : 0;
  for (int64_t e = 0; e < value.size(0); ++e) {
    fn(absl::StrReplaceAll(p.name, {{"{e}", absl::StrCat(first + e)}}), value.select(0, e));
  }
}

void FoldComputeGradients(std::vector<TrainableParam>& params) {
  at::NoGradGuard no_grad;
  for (TrainableParam& p : params) {
    if (!p.compute.defined() || !p.compute.grad().defined()) continue;
    at::Tensor g = p.compute.grad().to(at::kFloat);
    p.compute.mutable_grad() = at::Tensor();
    if (p.tensor.grad().defined()) {
      p.tensor.mutable_grad().add_(g);
    } else {
      p.tensor.mutable_grad() = g;
    }
  }
}

void RefreshComputeCopies(std::vector<TrainableParam>& params) {
  at::NoGradGuard no_grad;
  for (TrainableParam& p : params) {
    if (p.compute.defined()) p.compute.copy_(p.tensor);
  }
}

}  // namespace lathe::runtime
