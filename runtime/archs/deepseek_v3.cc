// DeepSeek-V3 (and the models built on it: Kimi-K2): pre-norm layers of
// multi-head latent attention and, after the first first_k_dense_replace
// dense SwiGLU layers, sigmoid-routed experts with ungated shared experts.
#include "runtime/archs/registry.h"
#include "runtime/latent_attention.h"
#include "runtime/sigmoid_moe.h"

namespace lathe::runtime {

absl::StatusOr<std::vector<std::unique_ptr<Block>>> LoadDeepseekV3Layers(const ModelConfig& c, ParamLoader& loader,
                                                                         const std::string& prefix,
                                                                         const ModelShard& shard) {
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
  return LoadPreNormLayers(
      c, loader, prefix, shard,
      [&](int64_t, const std::string& p) -> absl::StatusOr<std::unique_ptr<Mixer>> {
        return LatentAttention::Load(loader, p + "self_attn", c.hidden_size, c.num_attention_heads,
                                     c.latent_attention, shard);
      },
      [&](const std::string& mlp) -> absl::StatusOr<std::unique_ptr<Ffn>> {
        return SigmoidRoutedExperts::Load(loader, mlp, router, shard);
      });
}

}  // namespace lathe::runtime
