// DeepSeek-V3 and Kimi-K2 (runtime/archs/deepseek_v3.cc): latent attention,
// sigmoid-routed experts with ungated shared experts after the dense layers.
#include "params/archs/registry.h"
#include "params/blocks.h"

namespace lathe::params {

ParamTable DescribeDeepseekV3Layers(const runtime::ModelConfig& c, const std::string& prefix) {
  return DescribePreNormLayers(
      c, prefix,
      [&](int64_t, const std::string& p) {
        return DescribeLatentAttention(p + "self_attn", c.hidden_size, c.num_attention_heads, c.latent_attention);
      },
      [&](const std::string& mlp) {
        return DescribeSigmoidExperts(mlp, c.hidden_size, c.num_experts, c.moe_intermediate_size,
                                      c.shared_expert.intermediate_size);
      });
}

}  // namespace lathe::params
