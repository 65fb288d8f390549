// DeepSeek-V3 and Kimi-K2 (runtime/archs/deepseek_v3.cc): latent attention,
// sigmoid-routed experts with ungated shared experts after the dense layers.
#include "params/archs/registry.h"
#include "params/blocks.h"

namespace lathe::params {

ParamTable DescribeDeepseekV3Layers(const runtime::ModelConfig& c, const std::string& prefix) {
  return DescribePreNormLayers(
      c, prefix, [&](int64_t, const std::string& p) { return DescribeLatentAttention(c, p + "self_attn"); },
      [&](const std::string& mlp) { return DescribeSigmoidExperts(c, mlp); });
}

}  // namespace lathe::params
