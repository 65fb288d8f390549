// DeepSeek-V3's mixture-of-experts block (transformers 5.23's DeepseekV3MoE):
// a sigmoid router whose top-k is chosen on bias-corrected scores within the
// best expert groups, dropless routed SwiGLU experts (cut over ep, tokens
// over tp, as RoutedExperts), and ungated shared experts.
#ifndef LATHE_RUNTIME_SIGMOID_MOE_H_
#define LATHE_RUNTIME_SIGMOID_MOE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/model_config.h"
#include "runtime/block.h"
#include "runtime/ffn.h"

namespace lathe::runtime {

struct SigmoidRouterShape {
  int64_t hidden = 0;
  int64_t experts = 0;
  int64_t top_k = 0;
  int64_t inter = 0;  // one expert's width
  bool norm_topk_prob = true;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  double routed_scaling_factor = 1.0;
  int64_t shared_inter = 0;  // width of the shared experts together (0: none)
};

// The routing config `c` gives its MoE layers (DeepSeek-V3, Kimi, GLM-5).
SigmoidRouterShape SigmoidRouterOf(const ModelConfig& c);

// The routing of x [T, H]: scores = sigmoid(x·routerᵀ) in fp32; the groups
// (experts / n_group consecutive experts each) ranked by the sum of their two
// best scores + bias; the top_k of scores + bias within the topk_group best
// groups; weights the unbiased scores of those, divided by their sum (+1e-20)
// with norm_topk_prob, times routed_scaling_factor, in fp32 (an expert's
// output is multiplied by its weight in fp32 and rounded once).
// `bias` [E] fp32 selects only; no gradient reaches it.
MoeRouting RouteSigmoid(const at::Tensor& x, const at::Tensor& router, const at::Tensor& bias,
                        const SigmoidRouterShape& shape);

class SigmoidRoutedExperts final : public Ffn {
 public:
  // Loads `prefix`.gate (weight, e_score_correction_bias), the experts of
  // this ep rank and `prefix`.shared_experts.
  static absl::StatusOr<std::unique_ptr<SigmoidRoutedExperts>> Load(ParamLoader& loader, const std::string& prefix,
                                                                    const SigmoidRouterShape& shape,
                                                                    const ModelShard& shard);
  at::Tensor Forward(const at::Tensor& m, const LayerContext& ctx, MoeStats* stats) const override;
  bool routed() const override { return true; }
  void Visit(const TensorVisitor& fn) override;

 private:
  SigmoidRoutedExperts() = default;
  at::Tensor Routed(const at::Tensor& m, const LayerContext& ctx, MoeStats* stats) const;
  SigmoidRouterShape shape_;
  at::Tensor router_;  // [E, H]
  at::Tensor bias_;    // [E] fp32, frozen
  ExpertBank experts_;
  std::unique_ptr<SwiGluMlp> shared_;
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_SIGMOID_MOE_H_
