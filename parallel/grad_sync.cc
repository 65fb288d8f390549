// Bucketed gradient all-reduce and the global gradient norm.
#include "parallel/grad_sync.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

#include "parallel/model_parallel.h"

namespace lathe::parallel {

using runtime::GradSync;
using runtime::TrainableParam;

namespace {

// Sums `grads` over `g` in place, packed into buckets of at most `bucket_bytes`.
void AllReduceBucketed(const std::vector<at::Tensor>& grads, const Group& g, int64_t bucket_bytes) {
  if (!g.active()) return;
  size_t i = 0;
  while (i < grads.size()) {
    size_t j = i;
    int64_t bytes = 0;
    std::vector<at::Tensor> flat;
    do {
      bytes += grads[j].numel() * static_cast<int64_t>(grads[j].element_size());
      flat.push_back(grads[j].reshape({-1}));
      ++j;
    } while (j < grads.size() && bytes + grads[j].numel() * static_cast<int64_t>(grads[j].element_size()) <= bucket_bytes);
    at::Tensor bucket = at::cat(flat);
    AllReduceSumInPlace(bucket, g);
    int64_t offset = 0;
    for (size_t k = i; k < j; ++k) {
      grads[k].copy_(bucket.narrow(0, offset, grads[k].numel()).view_as(grads[k]));
      offset += grads[k].numel();
    }
    i = j;
  }
}

}  // namespace

void SyncGradients(std::vector<TrainableParam>& params, const ParallelContext& ctx, int64_t bucket_bytes) {
  at::NoGradGuard no_grad;
  // A rank without gradients (its replica got no datums) still joins the
  // sums with zeros whenever any rank has some; only when no rank of the
  // world has a gradient is nothing sent.
  bool none = true;
  for (const TrainableParam& p : params) none = none && !p.tensor.grad().defined();
  if (AllAgree(none, Group{ctx.world.get(), ctx.timeout})) return;
  const Group tp{ctx.tp.get(), ctx.timeout}, kv{ctx.kv_share.get(), ctx.timeout},
      data{ctx.data.get(), ctx.timeout}, expert{ctx.expert_data.get(), ctx.timeout};
  std::vector<at::Tensor> tp_partial, kv_partial, dense, experts;
  for (TrainableParam& p : params) {
    if (!p.tensor.grad().defined()) p.tensor.mutable_grad() = at::zeros_like(p.tensor);
    at::Tensor g = p.tensor.grad();
    switch (p.sync) {
      case GradSync::kTpPartial: tp_partial.push_back(g); break;
      case GradSync::kKvShared: kv_partial.push_back(g); break;
      default: break;
    }
    (p.sync == GradSync::kExpert ? experts : dense).push_back(g);
  }
  AllReduceBucketed(tp_partial, tp, bucket_bytes);
  AllReduceBucketed(kv_partial, kv, bucket_bytes);
  AllReduceBucketed(dense, data, bucket_bytes);
  AllReduceBucketed(experts, expert, bucket_bytes);
}

double GlobalGradNorm(const std::vector<TrainableParam>& params, const ParallelContext& ctx) {
  at::NoGradGuard no_grad;
  const bool first_data = ctx.data->rank() == 0, first_tp = ctx.place.tp_rank == 0;
  double sq = 0;
  for (const TrainableParam& p : params) {
    if (!p.tensor.grad().defined()) continue;
    bool owner = false;
    switch (p.sync) {
      case GradSync::kReplicated:
      case GradSync::kTpPartial: owner = first_data && first_tp; break;
      case GradSync::kTpSharded: owner = first_data; break;
      case GradSync::kKvShared: owner = first_data && ctx.kv_block_leader(); break;
      case GradSync::kExpert: owner = ctx.expert_data->rank() == 0; break;
    }
    if (owner) sq += at::linalg_vector_norm(p.tensor.grad(), 2, {}, false, at::kDouble).pow(2).item<double>();
  }
  at::Tensor total = at::tensor({sq}, at::kDouble);
  AllReduceSumInPlace(total, Group{ctx.world.get(), ctx.timeout});
  return std::sqrt(total.item<double>());
}

}  // namespace lathe::parallel
