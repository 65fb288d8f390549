// Multi-head latent attention (MLA) as transformers 5.23's
// DeepseekV3Attention computes it: queries through the low-rank
// q_a_proj → RMSNorm → q_b_proj (or q_proj), keys and values expanded per head
// by kv_b_proj from one normed latent of kv_a_proj_with_mqa, whose last
// qk_rope_head_dim columns are a rope key shared by every head; RoPE (pairs
// interleaved, or halves) on the rope part of q and k; causal softmax
// attention at the config's softmax scale; o_proj.
//
// Tensor parallelism cuts the heads as Megatron-Core does: q_b_proj /
// q_proj and kv_b_proj rows by head (column-parallel), o_proj columns
// (row-parallel); q_a_proj, kv_a_proj_with_mqa and both norms are held whole
// by every rank, which computes them on all tokens, so their gradients (and
// their adapters') are partial sums over tp.
//
// LoRA (attention group): q_a_proj, kv_a_proj_with_mqa, o_proj, and q_proj
// when there is no q_lora_rank; q_b_proj and kv_b_proj train only in full
// fine-tuning.
//
// GLM-5's sparse attention (SelectKeys): each query attends only to the
// keys a SparseIndexer selects, this layer's own or an earlier layer's;
// under context parallelism each member selects for its own rows and
// attends over the all-gathered keys and values with that selection.
#ifndef LATHE_RUNTIME_LATENT_ATTENTION_H_
#define LATHE_RUNTIME_LATENT_ATTENTION_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/block.h"
#include "runtime/sparse_indexer.h"
#include "core/model_config.h"

namespace lathe::runtime {

class LatentAttention final : public Mixer {
 public:
  // Loads `prefix` ("model.layers.3.self_attn") of `heads` heads for this
  // rank of `shard`. InvalidArgument when the heads cannot be cut over tp.
  static absl::StatusOr<std::unique_ptr<LatentAttention>> Load(ParamLoader& loader, const std::string& prefix,
                                                               int64_t hidden, int64_t heads,
                                                               const LatentAttentionConfig& config,
                                                               const ModelShard& shard);

  // Decoding (ctx.states) keeps per sequence and layer the normed latent
  // [length, kv_lora_rank] and the rope key after RoPE [length,
  // qk_rope_head_dim] (not per-head keys and values) and attends with
  // kv_b_proj absorbed: the query's nope part times kv_b_proj's key rows
  // scores the latent directly, and its value rows apply once to the
  // weighted sum of latents. Each sequence is computed on its own, so a
  // request's result does not depend on its batch.
  at::Tensor Forward(const at::Tensor& x, const LayerContext& ctx, size_t layer) const override;
  void Visit(const TensorVisitor& fn) override;

  // Makes the attention of layer `layer` sparse: its queries see only the
  // keys the indexer of layer `selection_layer` selects; when that is
  // `layer` the indexer `indexer_prefix` is loaded (frozen) into this layer,
  // and its selection is left in LayerContext::selections for the layers
  // after it. REQUIRES: q_lora_rank > 0; selection_layer ≤ layer.
  absl::Status SelectKeys(ParamLoader& loader, const std::string& indexer_prefix, const SparseIndexerShape& shape,
                          int64_t layer, int64_t selection_layer, const ModelShard& shard);

 private:
  LatentAttention() = default;
  // Attention of the new tokens (q [h, T, qk] after RoPE) of each sequence
  // of ctx over its cached and new latents -> [h, T, v_head_dim];
  // selections[i] (when given and masked) the keys sequence i's new tokens
  // see.
  at::Tensor Decode(const at::Tensor& q, const at::Tensor& latent, const at::Tensor& k_rope,
                    const std::vector<KeySelection>& selections, const LayerContext& ctx, size_t layer) const;
  // The sparse attention's selection for this forward (see SelectKeys).
  std::vector<KeySelection> Selection(const at::Tensor& x, const at::Tensor& q_resid, const LayerContext& ctx,
                                    size_t layer) const;
  // RoPE on the rope dims x [..., T, qk_rope_head_dim].
  at::Tensor Rope(const at::Tensor& x, const RopeTables& rope) const;

  LatentAttentionConfig config_;
  int64_t heads_ = 0;  // this rank's
  LoraLinear q_a_, q_b_, q_, kv_a_, kv_b_, o_;
  Norm q_a_norm_, kv_a_norm_;
  std::unique_ptr<SparseIndexer> indexer_;
  int64_t selection_layer_ = -1;  // -1: dense attention
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_LATENT_ATTENTION_H_
