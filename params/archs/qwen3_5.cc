// Qwen3.5 / Qwen3.6 (runtime/archs/qwen3_5.cc): Gated DeltaNet on the
// `linear_attention` layers, gated grouped-query attention on the others.
#include "params/archs/registry.h"
#include "params/blocks.h"

namespace lathe::params {

ParamTable DescribeQwen35Layers(const runtime::ModelConfig& c, const std::string& prefix) {
  return DescribePreNormLayers(c, prefix, [&](int64_t i, const std::string& p) {
    return c.IsLinearAttentionLayer(i) ? DescribeGatedDeltaNet(c, p + "linear_attn") : DescribeGqa(c, p + "self_attn");
  });
}

}  // namespace lathe::params
