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
  const SigmoidRouterShape router = SigmoidRouterOf(c);
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
