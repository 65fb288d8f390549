// DeepSeek sparse attention's indexer as transformers 5.23's GlmMoeDsaIndexer
// computes it: per query, index_n_heads query heads from the q LoRA's normed
// output (wq_b), one key per token (LayerNorm with bias of wk(x)),
// interleaved RoPE on the first qk_rope_head_dim dims of both, and the score
// of key j for query i Σ_h w_h(i)·relu(q_h(i)·k(j)/√index_head_dim), where
// w(i) = weights_proj(x_i)/√index_n_heads; each query
// keeps the index_topk best of the keys it may see (all of them when there
// are no more than index_topk). Projections in the model's dtype, scores in
// fp32, as transformers computes them.
//
// The indexer is computed without autograd and its tensors are never
// trained (transformers runs it under no_grad, so no gradient reaches them
// or, through it, q_a_proj) and carry no adapter. Under tensor parallelism
// every rank holds it whole and computes the same selection on all tokens.
// Under context parallelism the members all-gather the index keys of their
// rows and each selects for its own queries among its sequences' keys.
#ifndef LATHE_RUNTIME_SPARSE_INDEXER_H_
#define LATHE_RUNTIME_SPARSE_INDEXER_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/block.h"

namespace lathe::runtime {

struct SparseIndexerShape {
  int64_t hidden = 0;
  int64_t q_lora_rank = 0;
  int64_t heads = 0;     // index_n_heads
  int64_t head_dim = 0;  // index_head_dim
  int64_t rope_dim = 0;  // qk_rope_head_dim: the rotated leading dims
  int64_t topk = 0;      // index_topk
};

// The bool mask [n, first + n] selection s stands for, on `device`: true
// where query i (at position first + i) attends key j, a key j ≤ first + i
// among its top-k (every such key when s.top is undefined); undefined when
// !s.masked. Built a block of queries at a time.
at::Tensor KeyMask(const KeySelection& s, const at::Device& device);

// Causal attention of packed sequences, as PackedAttention with as many key
// as query heads (q, k [h, T, D], v [h, T, Dv] -> [h, T, Dv]), in which the
// queries of sequence i see only the keys selections[i] selects (none
// given, or not masked: every earlier key). Each sequence's mask is built
// just before its attention, so one exists at a time.
at::Tensor SelectedAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::vector<int64_t>& lengths, const std::vector<KeySelection>& selections,
                             double scale);

class SparseIndexer {
 public:
  // Loads `prefix` ("model.layers.3.self_attn.indexer") as
  // params::DescribeSparseIndexer describes it: wq_b, wk, k_norm (weight and
  // bias) and weights_proj, whole and frozen.
  static absl::StatusOr<SparseIndexer> Load(ParamLoader& loader, const std::string& prefix,
                                            const SparseIndexerShape& shape, const ModelShard& shard);

  // The keys each token of ctx's packed sequences attends to, from the
  // layer's normed input x [T, hidden] and the q LoRA's normed output
  // q_resid [T, q_lora_rank]: per sequence of n tokens (and `past` cached
  // ones when decoding) the top-k keys of each query (first = past), whose
  // mask (KeyMask) is [n, past + n]; not masked when n + past ≤ topk
  // (every earlier key is selected: plain causal attention). Decoding
  // (ctx.states) appends the tokens' index keys to slot 2 of the sequence's
  // state for `layer`. No autograd.
  //
  // Context parallelism (ctx.cp; x and q_resid this member's rows): one
  // selection per chunk of ctx.cp->chunks, first = b for the chunk's queries
  // at positions [b, b + L) (mask [L, b + L] over its sequence's keys up to
  // its end); not masked where the sequence has at most topk tokens. The index keys are
  // all-gathered over the cp group when some sequence is longer than topk.
  // Collective over the cp group, also for a member without rows.
  // REQUIRES: no ctx.states.
  std::vector<KeySelection> Select(const at::Tensor& x, const at::Tensor& q_resid, const LayerContext& ctx,
                                 size_t layer) const;
  void Visit(const TensorVisitor& fn);

 private:
  at::Tensor Rope(const at::Tensor& x, const RopeTables& rope) const;
  // The index keys [T, D] (after RoPE) and the queries [H, T, D] with their
  // head weights [T, H] of x's tokens.
  at::Tensor Keys(const at::Tensor& x, const RopeTables& rope) const;
  std::pair<at::Tensor, at::Tensor> Queries(const at::Tensor& x, const at::Tensor& q_resid,
                                            const RopeTables& rope) const;
  // The selection of queries q [H, n, D] at positions [first, first + n) in
  // their sequence, with weights w [n, H], over the sequence's keys k [m, D]
  // (m = first + n > topk): query i's top-k index scores among the keys
  // j <= first + i.
  KeySelection Choose(const at::Tensor& q, const at::Tensor& w, const at::Tensor& k, int64_t first) const;
  // Select under context parallelism.
  std::vector<KeySelection> SelectSplit(const at::Tensor& x, const at::Tensor& q_resid, const LayerContext& ctx) const;

  SparseIndexerShape shape_;
  at::Tensor wq_b_, wk_, k_norm_weight_, k_norm_bias_;
  at::Tensor weights_proj_;
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_SPARSE_INDEXER_H_
