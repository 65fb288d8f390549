// Grouped-query softmax attention as Qwen3, Llama and Mistral compute it:
// q/k/v projections (optionally with a per-head RMSNorm of q and k), RoPE,
// causal attention within each packed sequence, and the output projection.
// Qwen3.5's gated form adds, per head, a gate beside each query (q_proj
// twice as wide: [query | gate] per head) that scales the attention output
// by its sigmoid, and rotates only the first rotary_dim dims of each head.
// Heads are cut over tp (column-parallel q/k/v, row-parallel o; with fewer
// KV heads than ranks each rank holds one KV head), the sequence over cp.
// q/k/v biases are cut with their rows; o's is whole, added after the
// row-parallel reduction. They train in full fine-tuning, never under LoRA.
#ifndef LATHE_RUNTIME_ATTENTION_H_
#define LATHE_RUNTIME_ATTENTION_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/block.h"

namespace lathe::runtime {

// Causal attention of packed sequences (each attends only to itself):
// q [nH, T, D], k [nKV, T, D], v [nKV, T, Dv] -> [nH, T, Dv]; `gqa`: nKV < nH.
at::Tensor PackedAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::vector<int64_t>& lengths, double scale, bool gqa);

struct AttentionShape {
  int64_t hidden = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  bool qk_norm = false;      // per-head RMSNorm of q and k before RoPE
  bool norm_offset = false;  // those norms scale by (1 + w) (see Norm)
  bool output_gate = false;  // sigmoid gate per head from q_proj
  int64_t rotary_dim = 0;    // dims of each head RoPE rotates (0: all)
  bool qkv_bias = false;     // biases of q/k/v (Qwen2; attention_bias)
  bool o_bias = false;       // bias of o (attention_bias of Llama, Qwen3)
  double eps = 1e-6;
};

class GqaAttention final : public Mixer {
 public:
  // Loads `prefix` ("model.layers.3.self_attn") for this rank of `shard`.
  // InvalidArgument when the heads cannot be cut over tp.
  static absl::StatusOr<std::unique_ptr<GqaAttention>> Load(ParamLoader& loader, const std::string& prefix,
                                                            const AttentionShape& shape, const ModelShard& shard);

  at::Tensor Forward(const at::Tensor& x, const LayerContext& ctx, size_t layer) const override;
  void Visit(const TensorVisitor& fn) override;

 private:
  GqaAttention() = default;

  AttentionShape shape_;
  int64_t heads_ = 0, kv_heads_ = 0;  // this rank's
  LoraLinear q_, k_, v_, o_;
  Norm q_norm_, k_norm_;
  FusedLinears qkv_;
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_ATTENTION_H_
