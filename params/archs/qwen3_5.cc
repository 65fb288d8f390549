// Qwen3.5 / Qwen3.6 (runtime/archs/qwen3_5.cc): Gated DeltaNet on the
// `linear_attention` layers, gated grouped-query attention on the others.
#include "params/archs/registry.h"
#include "params/blocks.h"

namespace lathe::params {

ParamTable DescribeQwen35Layers(const runtime::ModelConfig& c, const std::string& prefix) {
  const GqaDims attention{c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                          c.qk_norm,     c.attn_output_gate,    false,                 false};
  return DescribePreNormLayers(c, prefix, [&](int64_t i, const std::string& p) {
    return c.IsLinearAttentionLayer(i) ? DescribeGatedDeltaNet(p + "linear_attn", c.hidden_size, c.linear_attention)
                                       : DescribeGqa(p + "self_attn", attention);
  });
}

}  // namespace lathe::params
