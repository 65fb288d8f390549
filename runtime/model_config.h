// The model hyperparameters lathe reads from a Hugging Face config.json:
// Qwen3 (dense), Qwen3-MoE and Llama/Mistral-style decoders, in the
// transformers 4.x and 5.x spellings.
#ifndef LATHE_RUNTIME_MODEL_CONFIG_H_
#define LATHE_RUNTIME_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace lathe::runtime {

struct ModelConfig {
  std::string architecture;  // e.g. "Qwen3ForCausalLM"
  std::string model_type;    // "qwen3", "qwen3_moe", "llama", "mistral"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  bool qk_norm = false;  // Qwen3: per-head RMSNorm of q and k before RoPE
  std::string dtype = "float32";  // the checkpoint's stored dtype
  // Mixture of experts (num_experts == 0: dense model).
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  bool norm_topk_prob = false;

  // True when decoder layer `layer` uses the sparse MoE block.
  bool IsMoeLayer(int64_t layer) const;
  // Whether some layer has a dense MLP (intermediate_size wide).
  bool HasDenseMlp() const;
  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
};

// Parses config.json text. InvalidArgument naming the field for an
// unsupported architecture, a missing or ill-typed field, or a feature lathe
// does not implement (rope scaling, sliding window, attention bias, ...).
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text);

// Reads <dir>/config.json. NotFound when absent.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_MODEL_CONFIG_H_
