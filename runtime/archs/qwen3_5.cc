// Qwen3.5 / Qwen3.6 (dense and MoE): hybrid pre-norm layers whose mixer is
// Gated DeltaNet (`linear_attention` layers) or gated softmax attention with
// partial RoPE (`full_attention`), (1 + w) RMSNorms, and a SwiGLU MLP or
// routed experts with a sigmoid-gated shared expert. The multimodal
// checkpoints' text tower is read from config.checkpoint.weight_prefix.
#include "runtime/archs/registry.h"
#include "runtime/attention.h"
#include "runtime/linear_attention.h"

namespace lathe::runtime {

absl::StatusOr<std::vector<std::unique_ptr<Block>>> LoadQwen35Layers(const ModelConfig& c, ParamLoader& loader,
                                                                     const std::string& prefix,
                                                                     const ModelShard& shard) {
  AttentionShape attention{c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.qk_norm};
  attention.norm_offset = c.norm_style == NormStyle::kOnePlusWeight;
  attention.output_gate = c.attn_output_gate;
  attention.rotary_dim = c.rotary.rotary_dim;
  attention.eps = c.rms_norm_eps;
  return LoadPreNormLayers(c, loader, prefix, shard,
                           [&](int64_t i, const std::string& p) -> absl::StatusOr<std::unique_ptr<Mixer>> {
                             if (c.IsLinearAttentionLayer(i)) {
                               return GatedDeltaNetMixer::Load(loader, p + "linear_attn", c.hidden_size,
                                                               c.linear_attention, c.rms_norm_eps, shard);
                             }
                             return GqaAttention::Load(loader, p + "self_attn", attention, shard);
                           });
}

}  // namespace lathe::runtime
