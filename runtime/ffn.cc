// SwiGluMlp and RoutedExperts: loading their cuts and their forwards.
#include "runtime/ffn.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "params/blocks.h"
#include "parallel/expert_parallel.h"

namespace lathe::runtime {

absl::StatusOr<std::unique_ptr<SwiGluMlp>> SwiGluMlp::Load(ParamLoader& loader, const std::string& prefix,
                                                           int64_t hidden, int64_t inter, const ModelShard& shard) {
  const int tp = shard.tp.size();
  if (inter % tp != 0) {
    return absl::InvalidArgumentError(absl::StrCat("MLP width ", inter, " cannot be cut over tp ", tp));
  }
  std::unique_ptr<SwiGluMlp> f(new SwiGluMlp());
  DescribedLoader rows(loader, params::DescribeSwiGlu(prefix, hidden, inter), shard);
  LATHE_ASSIGN_OR_RETURN(f->gate_, rows.Linear("gate_proj"));
  LATHE_ASSIGN_OR_RETURN(f->up_, rows.Linear("up_proj"));
  LATHE_ASSIGN_OR_RETURN(f->down_, rows.Linear("down_proj"));
  if (!loader.full_finetune()) {
    f->gate_up_.parts = {&f->gate_, &f->up_};
    f->gate_up_.Fuse();
  }
  return f;
}

void SwiGluMlp::Visit(const TensorVisitor& fn) {
  gate_up_.Visit(fn);
  for (LoraLinear* l : {&gate_, &up_, &down_}) VisitLinear(*l, fn);
}

at::Tensor SwiGluMlp::Forward(const at::Tensor& m, const LayerContext& ctx, MoeStats*) const {
  at::Tensor g, u;
  if (gate_up_.defined()) {
    auto gu = GroupedForward(m, gate_up_.weight, {&gate_, &up_}, ctx.enter);
    g = gu[0], u = gu[1];
  } else {
    at::Tensor in = ctx.enter ? ctx.enter(m) : m;
    g = gate_.Forward(in), u = up_.Forward(in);
  }
  return RowParallelForward(at::silu(g) * u, down_, ctx.reduce);
}

absl::Status LoadRouterAndExperts(DescribedLoader& rows, int64_t experts, const ModelShard& shard, at::Tensor* router,
                                  ExpertBank* bank) {
  const int ep = shard.ep.size();
  if (experts % ep != 0) {
    return absl::InvalidArgumentError(absl::StrCat(experts, " experts cannot be cut over ep ", ep));
  }
  LATHE_ASSIGN_OR_RETURN(*router, rows.Tensor("gate", GradSync::kTpPartial));
  LATHE_ASSIGN_OR_RETURN(*bank, rows.Experts());
  return absl::OkStatus();
}

absl::Status LoadRouterAndExperts(ParamLoader& loader, const std::string& prefix, int64_t experts, int64_t hidden,
                                  int64_t inter, const ModelShard& shard, at::Tensor* router, ExpertBank* bank) {
  DescribedLoader rows(loader, params::DescribeRouterAndExperts(prefix, experts, hidden, inter), shard);
  return LoadRouterAndExperts(rows, experts, shard, router, bank);
}

absl::StatusOr<std::unique_ptr<RoutedExperts>> RoutedExperts::Load(ParamLoader& loader, const std::string& prefix,
                                                                   const RouterShape& s, const ModelShard& shard) {
  std::unique_ptr<RoutedExperts> f(new RoutedExperts());
  f->shape_ = s;
  DescribedLoader rows(loader, params::DescribeRoutedExperts(prefix, s.hidden, s.experts, s.inter, s.shared_inter),
                       shard);
  LATHE_RETURN_IF_ERROR(LoadRouterAndExperts(rows, s.experts, shard, &f->router_, &f->experts_));
  if (s.shared_inter > 0) {
    LATHE_ASSIGN_OR_RETURN(f->shared_, SwiGluMlp::Load(loader, prefix + ".shared_expert", s.hidden, s.shared_inter,
                                                       shard));
    LATHE_ASSIGN_OR_RETURN(f->shared_gate_, rows.Linear("shared_expert_gate"));
  }
  return f;
}

void RoutedExperts::Visit(const TensorVisitor& fn) {
  fn(router_);
  ExpertBank& e = experts_;
  for (at::Tensor* t : {&e.gate, &e.up, &e.down, &e.gate_a, &e.gate_b, &e.up_a, &e.up_b, &e.down_a, &e.down_b}) {
    fn(*t);
  }
  if (shared_ != nullptr) {
    shared_->Visit(fn);
    VisitLinear(shared_gate_, fn);
  }
}

at::Tensor RoutedExperts::Forward(const at::Tensor& m, const LayerContext& ctx, MoeStats* stats) const {
  at::Tensor routed = Routed(m, ctx, stats);
  if (shared_ == nullptr) return routed;
  at::Tensor shared = shared_->Forward(m, ctx, nullptr);
  return routed + at::sigmoid(shared_gate_.Forward(m)) * shared;
}

at::Tensor RoutedExperts::Routed(const at::Tensor& m, const LayerContext& ctx, MoeStats* stats) const {
  MoeStats ignored;
  MoeStats& s = stats != nullptr ? *stats : ignored;
  const parallel::Group& tp = ctx.shard->tp;
  const parallel::Group& ep = ctx.shard->ep;
  if (tp.active() || ep.active()) {
    // Each tp rank routes its part of the (replicated) tokens; routing
    // statistics are summed over the expert group (or tp without one).
    at::Tensor part = parallel::ScatterRows(m, tp);
    at::Tensor out = parallel::ExpertParallelMoe(part, router_, experts_, shape_.top_k, shape_.norm_topk_prob, ep,
                                                 ep.active() ? ep : tp, &s);
    return parallel::GatherRows(out, m.size(0), tp);
  }
  return MoeForward(m, router_, experts_, shape_.top_k, shape_.norm_topk_prob, &s);
}

}  // namespace lathe::runtime
