// Qwen3, Qwen3-MoE, Qwen2, Llama and Mistral: pre-norm layers of grouped-query
// attention (Qwen3: with per-head q/k RMSNorm; Qwen2 and attention_bias:
// with projection biases) and a SwiGLU MLP or softmax
// top-k routed experts. Dialects of one layout, told apart by config fields.
#include "runtime/archs/registry.h"
#include "runtime/attention.h"

namespace lathe::runtime {

absl::StatusOr<std::vector<std::unique_ptr<Block>>> LoadLlamaFamilyLayers(const ModelConfig& c,
                                                                          ParamLoader& loader,
                                                                          const std::string& prefix,
                                                                          const ModelShard& shard) {
  AttentionShape attention{c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.qk_norm};
  attention.eps = c.rms_norm_eps;
  attention.qkv_bias = c.qkv_bias;
  attention.o_bias = c.o_bias;
  return LoadPreNormLayers(c, loader, prefix, shard,
                           [&](int64_t, const std::string& p) -> absl::StatusOr<std::unique_ptr<Mixer>> {
                             return GqaAttention::Load(loader, p + "self_attn", attention, shard);
                           });
}

}  // namespace lathe::runtime
