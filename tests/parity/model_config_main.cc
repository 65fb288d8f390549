// lathe_model_config: prints what lathe reads from a model folder's
// config.json, as JSON, so the Python tests can hold it against transformers.
//
//   lathe_model_config DIR
//
// Exit 0 when LoadModelConfig parses it, 1 otherwise (message on stderr).
#include <cstdio>

#include "nlohmann/json.hpp"
#include "core/model_config.h"

namespace lathe::runtime {
namespace {

nlohmann::json ToJson(const ModelConfig& c) {
  nlohmann::json layer_types = nlohmann::json::array();
  for (LayerType t : c.layer_types) {
    layer_types.push_back(t == LayerType::kLinearAttention ? "linear_attention" : "full_attention");
  }
  const LinearAttentionConfig& l = c.linear_attention;
  return {
      {"architecture", c.architecture},
      {"model_type", c.model_type},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"qk_norm", c.qk_norm},
      {"num_experts", c.num_experts},
      {"num_experts_per_tok", c.num_experts_per_tok},
      {"moe_intermediate_size", c.moe_intermediate_size},
      {"norm_topk_prob", c.norm_topk_prob},
      {"layer_types", layer_types},
      {"linear_attention",
       {{"num_key_heads", l.num_key_heads},
        {"num_value_heads", l.num_value_heads},
        {"key_head_dim", l.key_head_dim},
        {"value_head_dim", l.value_head_dim},
        {"conv_kernel_size", l.conv_kernel_size}}},
      {"rotary",
       {{"partial_rotary_factor", c.rotary.partial_rotary_factor},
        {"rotary_dim", c.rotary.rotary_dim},
        {"mrope_section", c.rotary.mrope_section},
        {"mrope_interleaved", c.rotary.mrope_interleaved}}},
      {"attn_output_gate", c.attn_output_gate},
      {"norm_style", c.norm_style == NormStyle::kOnePlusWeight ? "one_plus_weight" : "weight"},
      {"shared_expert",
       {{"intermediate_size", c.shared_expert.intermediate_size},
        {"sigmoid_gate", c.shared_expert.sigmoid_gate}}},
      {"mlp_only_layers", c.mlp_only_layers},
      {"latent_attention",
       {{"q_lora_rank", c.latent_attention.q_lora_rank},
        {"kv_lora_rank", c.latent_attention.kv_lora_rank},
        {"qk_nope_head_dim", c.latent_attention.qk_nope_head_dim},
        {"qk_rope_head_dim", c.latent_attention.qk_rope_head_dim},
        {"v_head_dim", c.latent_attention.v_head_dim},
        {"rope_interleave", c.latent_attention.rope_interleave},
        {"softmax_scale", c.latent_attention.softmax_scale}}},
      {"sigmoid_router",
       {{"enabled", c.sigmoid_router.enabled},
        {"n_group", c.sigmoid_router.n_group},
        {"topk_group", c.sigmoid_router.topk_group},
        {"routed_scaling_factor", c.sigmoid_router.routed_scaling_factor}}},
      {"sparse_indexer",
       {{"index_topk", c.sparse_indexer.index_topk},
        {"index_head_dim", c.sparse_indexer.index_head_dim},
        {"index_n_heads", c.sparse_indexer.index_n_heads},
        {"selection_layer", c.sparse_indexer.selection_layer}}},
      {"rope",
       {{"type", c.rope.type}, {"factor", c.rope.factor}, {"attention_factor", c.rope.attention_factor}}},
      {"checkpoint",
       {{"weight_prefix", c.checkpoint.weight_prefix},
        {"lm_head", c.checkpoint.lm_head},
        {"skip_prefixes", c.checkpoint.skip_prefixes}}},
  };
}

}  // namespace
}  // namespace lathe::runtime

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: lathe_model_config DIR\n");
    return 1;
  }
  auto config = lathe::runtime::LoadModelConfig(argv[1]);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", config.status().ToString().c_str());
    return 1;
  }
  std::printf("%s\n", lathe::runtime::ToJson(*config).dump(2).c_str());
  return 0;
}
