// Matmul weights per token, from config.json's shapes.
#include "dp_worker/model_flops.h"

namespace lathe::dp_worker {

int64_t ActiveParameters(const runtime::ModelConfig& c) {
  const int64_t h = c.hidden_size;
  int64_t total = h * c.vocab_size;  // the unembedding (lm_head or the tied embedding)
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    if (c.IsLinearAttentionLayer(layer)) {
      const runtime::LinearAttentionConfig& la = c.linear_attention;
      // in_proj_qkvz (q, k, v, z), in_proj_ba (b, a per value head), out_proj.
      total += h * (2 * la.key_dim() + 2 * la.value_dim()) + h * 2 * la.num_value_heads + la.value_dim() * h;
    } else {
      const int64_t q = c.q_dim() * (c.attn_output_gate ? 2 : 1);
      total += h * q + 2 * h * c.kv_dim() + c.q_dim() * h;
    }
    if (c.IsMoeLayer(layer)) {
      total += h * c.num_experts + c.num_experts_per_tok * 3 * h * c.moe_intermediate_size;
      if (c.shared_expert.intermediate_size > 0) {
        total += 3 * h * c.shared_expert.intermediate_size + (c.shared_expert.sigmoid_gate ? h : 0);
      }
    } else {
      total += 3 * h * c.intermediate_size;
    }
  }
  return total;
}

int64_t AttentionLayers(const runtime::ModelConfig& c) {
  int64_t layers = 0;
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) layers += !c.IsLinearAttentionLayer(layer);
  return layers;
}

}  // namespace lathe::dp_worker
