// Generates a small random Hugging Face model folder (config.json +
// model.safetensors) for demos, smoke tests and benchmarks.
#ifndef LATHE_RUNTIME_TINY_MODEL_H_
#define LATHE_RUNTIME_TINY_MODEL_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace lathe::runtime {

struct TinyModelSpec {
  bool moe = true;  // Qwen3MoeForCausalLM, else Qwen3ForCausalLM
  int64_t vocab_size = 256;
  int64_t hidden_size = 64;
  int64_t num_layers = 2;
  int64_t num_heads = 4;
  int64_t num_kv_heads = 2;
  int64_t head_dim = 16;
  int64_t intermediate_size = 128;
  int64_t num_experts = 8;
  int64_t experts_per_token = 2;
  int64_t moe_intermediate_size = 32;
  int64_t max_position_embeddings = 4096;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v/o biases (Qwen3's attention_bias)
  // DeepseekV3ForCausalLM instead: latent attention (q LoRA rank 24, latent
  // 16, nope = head_dim, rope 8, values head_dim wide, interleaved RoPE) and
  // the first layer dense, the rest sigmoid-routed with one shared expert.
  bool latent_attention = false;
  // With latent_attention, GlmMoeDsaForCausalLM instead: the same layers with
  // GLM-5's sparse attention (index_topk 8, 16 indexer heads of 16; even
  // layers run their own indexer, odd ones share the previous layer's).
  bool sparse_attention = false;
  uint64_t seed = 0;
};

// Writes the folder `dir` (created if missing). Weights ~ N(0, 0.02²) from
// `seed`, norms 1. Experts are stored per expert, as the Hub checkpoints are.
absl::Status WriteTinyModel(const std::string& dir, const TinyModelSpec& spec);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_TINY_MODEL_H_
