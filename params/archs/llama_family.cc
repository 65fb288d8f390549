// Qwen3, Qwen3-MoE, Qwen2, Llama and Mistral (runtime/archs/llama_family.cc):
// grouped-query attention and a SwiGLU MLP or softmax-routed experts.
#include "params/archs/registry.h"
#include "params/blocks.h"

namespace lathe::params {

ParamTable DescribeLlamaFamilyLayers(const runtime::ModelConfig& c, const std::string& prefix) {
  const GqaDims attention{c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                          c.qk_norm,     false,                 c.qkv_bias,            c.o_bias};
  return DescribePreNormLayers(c, prefix, [&](int64_t, const std::string& p) {
    return DescribeGqa(p + "self_attn", attention);
  });
}

}  // namespace lathe::params
