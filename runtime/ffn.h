// The feed-forward parts of a decoder layer: the dense SwiGLU MLP (width cut
// over tp) and dropless routed experts (softmax top-k router; experts cut
// over ep, tokens over tp).
#ifndef LATHE_RUNTIME_FFN_H_
#define LATHE_RUNTIME_FFN_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/block.h"

namespace lathe::runtime {

// down(silu(gate(m)) * up(m)).
class SwiGluMlp final : public Ffn {
 public:
  // Loads `prefix` ("model.layers.0.mlp") of width `inter` for this rank.
  static absl::StatusOr<std::unique_ptr<SwiGluMlp>> Load(ParamLoader& loader, const std::string& prefix,
                                                         int64_t hidden, int64_t inter, const ModelShard& shard);
  at::Tensor Forward(const at::Tensor& m, const LayerContext& ctx, MoeStats* stats) const override;
  void Visit(const TensorVisitor& fn) override;

 private:
  SwiGluMlp() = default;
  LoraLinear gate_, up_, down_;
  FusedLinears gate_up_;
};

struct RouterShape {
  int64_t hidden = 0;
  int64_t experts = 0;
  int64_t top_k = 0;
  int64_t inter = 0;  // one expert's width
  bool norm_topk_prob = false;
  int64_t shared_inter = 0;  // width of the shared expert (0: none)
};

// Softmax top-k routing over every expert, every token to its k experts;
// with a shared expert (Qwen3.5-MoE) every token also goes through it,
// scaled by the sigmoid of its gate (shared_expert_gate, one output).
// The router `prefix`.gate.weight [experts, hidden] (each tp rank routes its own
// tokens: a partial gradient) and this ep rank's experts of width `inter`, as every
// routed MoE block loads them; InvalidArgument when ep does not divide the experts.
absl::Status LoadRouterAndExperts(ParamLoader& loader, const std::string& prefix, int64_t experts, int64_t hidden,
                                  int64_t inter, const ModelShard& shard, at::Tensor* router, ExpertBank* bank);
// The same from a block's description holding the rows "gate" and
// "experts.*" (params::DescribeRouterAndExperts).
absl::Status LoadRouterAndExperts(DescribedLoader& rows, int64_t experts, const ModelShard& shard, at::Tensor* router,
                                  ExpertBank* bank);

class RoutedExperts final : public Ffn {
 public:
  // Loads the router `prefix`.gate and the experts of this ep rank.
  static absl::StatusOr<std::unique_ptr<RoutedExperts>> Load(ParamLoader& loader, const std::string& prefix,
                                                             const RouterShape& shape, const ModelShard& shard);
  at::Tensor Forward(const at::Tensor& m, const LayerContext& ctx, MoeStats* stats) const override;
  bool routed() const override { return true; }
  void Visit(const TensorVisitor& fn) override;

 private:
  RoutedExperts() = default;
  at::Tensor Routed(const at::Tensor& m, const LayerContext& ctx, MoeStats* stats) const;
  RouterShape shape_;
  at::Tensor router_;  // [E, H]
  ExpertBank experts_;
  std::unique_ptr<SwiGluMlp> shared_;
  LoraLinear shared_gate_;  // [1, H]
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_FFN_H_
