// The model hyperparameters lathe reads from a Hugging Face config.json:
// Qwen3 (dense), Qwen3-MoE, Qwen2 / Qwen2.5 and Llama/Mistral-style decoders
// (Llama 3.x included), in the transformers 4.x and 5.x spellings, and the
// Qwen3.5 / Qwen3.6 hybrids.
#ifndef LATHE_CORE_MODEL_CONFIG_H_
#define LATHE_CORE_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace lathe::runtime {

// What a decoder layer mixes tokens with (config.json `layer_types`).
enum class LayerType { kFullAttention, kLinearAttention };

// How an RMSNorm applies its weight: x̂·w (Llama, Qwen3) or x̂·(1 + w)
// (Qwen3.5: weights stored as γ − 1, initialised to 0). Qwen3.5's gated
// norm inside the linear-attention layers is x̂·w either way.
enum class NormStyle { kWeight, kOnePlusWeight };

// The rotary embedding's extent: RoPE (NeoX rotate-half) on the first
// `rotary_dim` = int(head_dim × partial_rotary_factor) dims of each head, the
// rest passed through. Qwen3.5's multimodal RoPE (mrope_section) gives every
// text position the same index on its three axes, which makes it exactly
// 1-D RoPE over rotary_dim (transformers 5.23, Qwen3_5TextRotaryEmbedding):
// the section is kept for export only.
struct RotaryConfig {
  double partial_rotary_factor = 1.0;
  int64_t rotary_dim = 0;
  std::vector<int64_t> mrope_section;  // empty: plain RoPE
  bool mrope_interleaved = false;
};

// Gated DeltaNet, the linear attention of Qwen3.5's `linear_attention`
// layers: projections in_proj_qkv (hidden → 2·key_dim + value_dim), in_proj_z
// (→ value_dim), in_proj_a and in_proj_b (→ num_value_heads), a depthwise
// causal conv1d of `conv_kernel_size` over the qkv channels, out_proj.
struct LinearAttentionConfig {
  int64_t num_key_heads = 0;     // linear_num_key_heads
  int64_t num_value_heads = 0;   // linear_num_value_heads (a multiple of num_key_heads)
  int64_t key_head_dim = 0;      // linear_key_head_dim
  int64_t value_head_dim = 0;    // linear_value_head_dim
  int64_t conv_kernel_size = 0;  // linear_conv_kernel_dim

  int64_t key_dim() const { return num_key_heads * key_head_dim; }
  int64_t value_dim() const { return num_value_heads * value_head_dim; }
  int64_t conv_dim() const { return 2 * key_dim() + value_dim(); }
};

// A MoE layer's always-on expert (Qwen3.5-MoE: `mlp.shared_expert.*`, a
// SwiGLU of `intermediate_size`, scaled by sigmoid(`mlp.shared_expert_gate`)).
struct SharedExpertConfig {
  int64_t intermediate_size = 0;  // 0: none
  bool sigmoid_gate = false;
};

// Multi-head latent attention (DeepSeek-V3's MLA): queries through the
// low-rank q_a_proj → RMSNorm → q_b_proj (q_proj when q_lora_rank is 0),
// keys and values from one latent (kv_a_proj_with_mqa → [latent | rope key],
// RMSNorm of the latent, kv_b_proj → per head [key | value]); the rope part
// of the key is one head shared by all. Heads are qk_nope_head_dim +
// qk_rope_head_dim wide for q·k, v_head_dim for the values.
struct LatentAttentionConfig {
  int64_t q_lora_rank = 0;  // 0: q_proj (null in config.json)
  int64_t kv_lora_rank = 0;  // 0: not latent attention
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  bool rope_interleave = true;  // rotary pairs (x0, x1), (x2, x3), ... rather than halves
  // The attention's softmax scale: qk_head_dim^-1/2, times yarn's
  // mscale(factor, mscale_all_dim)² when the rope is scaled.
  double softmax_scale = 0.0;

  bool enabled() const { return kv_lora_rank > 0; }
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
};

// DeepSeek-V3's router: sigmoid scores in fp32; the top-k is chosen on the
// scores plus a per-expert correction bias (the checkpoint's
// mlp.gate.e_score_correction_bias, never trained) within the `topk_group`
// best of `n_group` expert groups (a group's score: the sum of its two best);
// the weights are the unbiased scores, renormalised with norm_topk_prob, times
// `routed_scaling_factor`. The shared experts (mlp.shared_experts, a SwiGLU
// of moe_intermediate_size × n_shared_experts) are added ungated.
struct SigmoidRouterConfig {
  bool enabled = false;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  double routed_scaling_factor = 1.0;
};

// DeepSeek sparse attention's indexer (GLM-5's DSA, transformers'
// GlmMoeDsaIndexer): per query it scores every earlier key of its sequence
// with index_n_heads heads of index_head_dim (RoPE on the first
// qk_rope_head_dim dims) and the latent attention attends only to the
// index_topk best. Layers whose indexer_types entry is "shared" have no
// indexer and reuse the selection of the previous "full" layer.
struct SparseIndexerConfig {
  int64_t index_topk = 0;  // 0: no indexer (plain latent attention)
  int64_t index_head_dim = 0;
  int64_t index_n_heads = 0;
  // Per layer, the layer whose indexer selects its keys: itself ("full") or
  // the previous full layer ("shared").
  std::vector<int64_t> selection_layer;

  bool enabled() const { return index_topk > 0; }
};

// Where the text model's tensors sit in the checkpoint.
struct CheckpointLayout {
  std::string weight_prefix = "model.";  // before "embed_tokens", "layers.N", "norm"
  std::string lm_head = "lm_head.weight";
  // Tensors under these prefixes are not the text model's (vision tower,
  // multi-token-prediction head) and are skipped on load.
  std::vector<std::string> skip_prefixes;
};

// The rotary embedding's frequencies as transformers' rope types compute them
// (tensor/rope.h turns them into inverse frequencies): "default", "linear",
// "llama3" and "yarn". Read from `rope_parameters` (transformers 5.x) or
// `rope_scaling` + `rope_theta` (4.x), validated at parse time.
struct RopeSettings {
  std::string type = "default";
  double theta = 10000.0;
  double factor = 1.0;                           // linear, llama3, yarn
  double low_freq_factor = 1.0;                  // llama3
  double high_freq_factor = 4.0;                 // llama3
  int64_t original_max_position_embeddings = 0;  // llama3, yarn
  double beta_fast = 32.0, beta_slow = 1.0;      // yarn
  bool truncate = true;                          // yarn: integer correction range
  // The factor cos and sin are multiplied by (yarn's attention_factor, given
  // or derived from factor / mscale / mscale_all_dim); 1 for the others.
  double attention_factor = 1.0;
};

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
  double rope_theta = 10000.0;  // == rope.theta
  RopeSettings rope;
  bool tie_word_embeddings = false;
  bool qk_norm = false;  // Qwen3: per-head RMSNorm of q and k before RoPE
  // Biases of the attention projections: q/k/v (Qwen2; attention_bias of
  // Llama and Qwen3) and o (attention_bias of Llama and Qwen3).
  bool qkv_bias = false;
  bool o_bias = false;
  std::string dtype = "float32";  // the checkpoint's stored dtype
  // Mixture of experts (num_experts == 0: dense model).
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  bool norm_topk_prob = false;
  // Qwen3.5 / Qwen3.6 (defaults elsewhere: every layer full attention, x̂·w
  // norms, whole-head RoPE, no gate, no shared expert, "model." weights).
  std::vector<LayerType> layer_types;  // num_hidden_layers entries, or empty
  LinearAttentionConfig linear_attention;
  RotaryConfig rotary;
  bool attn_output_gate = false;  // q_proj 2× wide: per head [q | gate], out ·= sigmoid(gate)
  NormStyle norm_style = NormStyle::kWeight;
  SharedExpertConfig shared_expert;
  CheckpointLayout checkpoint;
  // DeepSeek-V3 (defaults elsewhere: GQA, softmax routing).
  LatentAttentionConfig latent_attention;
  SigmoidRouterConfig sigmoid_router;
  // GLM-5 (GlmMoeDsaForCausalLM): DeepSeek-V3's layers with the indexer.
  SparseIndexerConfig sparse_indexer;

  // True when decoder layer `layer` uses the sparse MoE block.
  bool IsMoeLayer(int64_t layer) const;
  // Whether some layer has a dense MLP (intermediate_size wide).
  bool HasDenseMlp() const;
  // Whether decoder layer `layer` is a Gated DeltaNet layer.
  bool IsLinearAttentionLayer(int64_t layer) const;
  // Whether some layer is not full softmax attention.
  bool IsHybrid() const;
  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
};

// Parses config.json text. InvalidArgument naming the field for an
// unsupported architecture, a missing or ill-typed field, a bad RoPE value,
// or a feature lathe does not implement (another rope type, a sliding window
// smaller than the context, MLP biases, ...).
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text);

// Reads and parses <dir>/config.json. NotFound when absent; errors name the
// path.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_MODEL_CONFIG_H_
