// Qwen3, Qwen3-MoE, Qwen2, Llama and Mistral (runtime/archs/llama_family.cc):
// grouped-query attention and a SwiGLU MLP or softmax-routed experts.
#include "params/archs/registry.h"
#include "params/blocks.h"

namespace lathe::params {

ParamTable DescribeLlamaFamilyLayers(const runtime::ModelConfig& c, const std::string& prefix) {
  return DescribePreNormLayers(c, prefix, [&](int64_t, const std::string& p) {
    return DescribeGqa(c, p + "self_attn");
  });
}

}  // namespace lathe::params
