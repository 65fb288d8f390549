// SigmoidRoutedExperts: the router, loading the cuts, and the forward.
#include "runtime/sigmoid_moe.h"

#include <ATen/ATen.h>

#include <limits>

#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "params/blocks.h"
#include "parallel/expert_parallel.h"

namespace lathe::runtime {

SigmoidRouterShape SigmoidRouterOf(const ModelConfig& c) {
  SigmoidRouterShape router;
  router.hidden = c.hidden_size;
  router.experts = c.num_experts;
  router.top_k = c.num_experts_per_tok;
  router.inter = c.moe_intermediate_size;
  router.norm_topk_prob = c.norm_topk_prob;
  router.n_group = c.sigmoid_router.n_group;
  router.topk_group = c.sigmoid_router.topk_group;
  router.routed_scaling_factor = c.sigmoid_router.routed_scaling_factor;
  router.shared_inter = c.shared_expert.intermediate_size;
  return router;
}
namespace {

// at::sigmoid computes the last (n mod twice the vector width) elements of a
// tensor with scalar code, whose rounding may differ from the vector code's:
// a token's scores would then depend on how many rows its batch has. With
// rows padded to a multiple of 64 every element takes the vector code,
// whatever the row count (decoding's batch invariance).
at::Tensor RowInvariantSigmoid(const at::Tensor& logits) {
  const int64_t e = logits.size(1), padded = (e + 63) / 64 * 64;
  if (padded == e) return at::sigmoid(logits);
  return at::sigmoid(at::constant_pad_nd(logits, {0, padded - e})).narrow(1, 0, e);
}

}  // namespace

MoeRouting RouteSigmoid(const at::Tensor& x, const at::Tensor& router, const at::Tensor& bias,
                        const SigmoidRouterShape& s) {
  const int64_t t = x.size(0), e = router.size(0);
  at::Tensor scores = RowInvariantSigmoid(Linear(x.to(at::kFloat), router.to(at::kFloat)));
  at::Tensor choice = scores.detach() + bias;
  if (s.topk_group < s.n_group) {
    at::Tensor grouped = choice.reshape({t, s.n_group, e / s.n_group});
    at::Tensor group_scores = std::get<0>(at::topk(grouped, 2, -1)).sum(-1);  // [T, G]
    at::Tensor best = std::get<1>(at::topk(group_scores, s.topk_group, -1, /*largest=*/true, /*sorted=*/false));
    at::Tensor keep = at::zeros_like(group_scores, at::kBool).scatter_(1, best, true);
    choice = choice.masked_fill(keep.unsqueeze(-1).expand_as(grouped).reshape({t, e}).logical_not(),
                                -std::numeric_limits<float>::infinity());
  }
  at::Tensor index = std::get<1>(at::topk(choice, s.top_k, -1, /*largest=*/true, /*sorted=*/false));
  at::Tensor weights = scores.gather(1, index);
  if (s.norm_topk_prob) weights = weights / (weights.sum(-1, /*keepdim=*/true) + 1e-20);
  // The weights stay fp32: transformers multiplies each expert's output by
  // them in fp32 and rounds the product once.
  return SortByExpert(weights * s.routed_scaling_factor, index, e);
}

absl::StatusOr<std::unique_ptr<SigmoidRoutedExperts>> SigmoidRoutedExperts::Load(ParamLoader& loader,
                                                                                  const std::string& prefix,
                                                                                  const SigmoidRouterShape& s,
                                                                                  const ModelShard& shard) {
  std::unique_ptr<SigmoidRoutedExperts> f(new SigmoidRoutedExperts());
  f->shape_ = s;
  DescribedLoader rows(loader, params::DescribeSigmoidExperts(prefix, s.hidden, s.experts, s.inter, s.shared_inter),
                       shard);
  LATHE_RETURN_IF_ERROR(LoadRouterAndExperts(rows, s.experts, shard, &f->router_, &f->experts_));
  LATHE_ASSIGN_OR_RETURN(f->bias_, rows.Frozen("gate.e_score_correction_bias"));
  if (s.shared_inter > 0) {
    LATHE_ASSIGN_OR_RETURN(f->shared_, SwiGluMlp::Load(loader, prefix + ".shared_experts", s.hidden, s.shared_inter,
                                                       shard));
  }
  return f;
}

void SigmoidRoutedExperts::Visit(const TensorVisitor& fn) {
  fn(router_);
  fn(bias_);
  ExpertBank& e = experts_;
  for (at::Tensor* t : {&e.gate, &e.up, &e.down, &e.gate_a, &e.gate_b, &e.up_a, &e.up_b, &e.down_a, &e.down_b}) {
    fn(*t);
  }
  if (shared_ != nullptr) shared_->Visit(fn);
}

at::Tensor SigmoidRoutedExperts::Forward(const at::Tensor& m, const LayerContext& ctx, MoeStats* stats) const {
  at::Tensor routed = Routed(m, ctx, stats);
  if (shared_ == nullptr) return routed;
  return routed + shared_->Forward(m, ctx, nullptr);
}

at::Tensor SigmoidRoutedExperts::Routed(const at::Tensor& m, const LayerContext& ctx, MoeStats* stats) const {
  MoeStats ignored;
  MoeStats& s = stats != nullptr ? *stats : ignored;
  const parallel::Group& tp = ctx.shard->tp;
  const parallel::Group& ep = ctx.shard->ep;
  if (tp.active() || ep.active()) {
    // Each tp rank routes its part of the (replicated) tokens; routing
    // statistics are summed over the expert group (or tp without one).
    at::Tensor part = parallel::ScatterRows(m, tp);
    MoeRouting r = RouteSigmoid(part, router_, bias_, shape_);
    at::Tensor out = parallel::ExpertParallelMoe(part, r, shape_.experts, experts_, ep, ep.active() ? ep : tp, &s);
    return parallel::GatherRows(out, m.size(0), tp);
  }
  MoeRouting r = RouteSigmoid(m, router_, bias_, shape_);
  at::Tensor expert_out = RunExperts(m.index_select(0, r.token_of), r.counts, experts_);
  s = StatsOf(r.counts);
  return at::zeros_like(m).index_add(0, r.token_of, (expert_out * r.slot_weight).to(m.scalar_type()));
}

}  // namespace lathe::runtime
