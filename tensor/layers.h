// The building blocks of the decoder: linear layers with an optional LoRA
// adapter, RMSNorm, rotary embeddings, and the dropless mixture-of-experts
// block. Pure tensor math; nothing here knows about parallelism or files.
#ifndef LATHE_TENSOR_LAYERS_H_
#define LATHE_TENSOR_LAYERS_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "core/model_config.h"

namespace lathe::runtime {

// While one lives on a thread, the products below (and DecoderModel's) use
// InvariantLinear: each row's result is independent of the other rows in the
// batch, so a decoded request gets the same tokens whatever shares its batch.
// Inference only (no autograd through those products).
class BatchInvariantScope {
 public:
  BatchInvariantScope();
  ~BatchInvariantScope();
  BatchInvariantScope(const BatchInvariantScope&) = delete;
  BatchInvariantScope& operator=(const BatchInvariantScope&) = delete;

 private:
  bool previous_;
};

// Whether a BatchInvariantScope lives on this thread.
bool InBatchInvariantScope();

// x wᵀ for x [T, in], w [out, in] of one dtype: at::mm, or InvariantLinear
// inside a BatchInvariantScope (bf16 operands are widened to fp32 for it,
// exactly, and its fp32 result rounded back to bf16 once).
at::Tensor Linear(const at::Tensor& x, const at::Tensor& w);
// y + x wᵀ, the same way.
at::Tensor AddLinear(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w);

// The input of an adapter whose A is `a`: x cast to A's dtype (peft casts
// the input to the adapter's dtype).
at::Tensor AdapterInput(const at::Tensor& x, const at::Tensor& a);
// y + xa Bᵀ for the base output y and the scaled adapter activations xa
// [T, r] (in B's dtype): when y is narrower than B (a bf16 base, an fp32
// adapter) the sum is taken in B's dtype and cast back to y's, as peft does.
at::Tensor AddAdapter(const at::Tensor& y, const at::Tensor& xa, const at::Tensor& b);

// y = x Wᵀ + scale · (x Aᵀ) Bᵀ for x [T, in]. `lora_a` [r, in] and `lora_b`
// [out, r] are undefined when the layer has no adapter. The adapter may be
// wider than the base (fp32 A/B on a bf16 W): see AdapterInput, AddAdapter.
// `bias` [out] (undefined: none) is added to the base product in its GEMM (as
// F.linear does), before the adapter term, as peft adds the adapter to the
// base layer's output.
struct LoraLinear {
  at::Tensor weight;  // [out, in]
  at::Tensor lora_a;
  at::Tensor lora_b;
  double scale = 0.0;
  at::Tensor bias;

  at::Tensor Forward(const at::Tensor& x) const;
};

// A hook at the boundary of a tensor-parallel region (null: none, one rank).
using RegionFn = std::function<at::Tensor(const at::Tensor&)>;

// Several LoraLinear layers that read the same input, evaluated with one GEMM
// over their concatenated weights (`fused` [Σ out, in], whose row blocks the
// parts' weights are views of) and one GEMM for their LoRA A matrices.
// Returns one output per part. REQUIRES: every part has an adapter or none.
// Column-parallel use: the parts hold this rank's output rows and their
// (replicated) A matrices; `enter` is applied to the input of the base GEMM
// and to the rank-sized adapter input, so each gets its gradient summed once;
// each part's bias holds its rows (column-parallel: cut with them).
std::vector<at::Tensor> GroupedForward(const at::Tensor& x, const at::Tensor& fused,
                                       const std::vector<const LoraLinear*>& parts,
                                       const RegionFn& enter = nullptr);

// Row-parallel evaluation: `x` and the layer's weight and A hold this rank's
// input columns, B is replicated; `reduce` sums the partial base output and
// the partial adapter input over the ranks (one call). Null: layer.Forward(x).
// The bias (whole) is added once, after the reduction.
at::Tensor RowParallelForward(const at::Tensor& x, const LoraLinear& layer, const RegionFn& reduce);

// y = weight · (x / rms(x)), with the normalisation in fp32 and the cast back
// to x's dtype before the multiplication (as transformers computes it).
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps);

// cos and sin tables [T, head_dim] for positions 0..T-1, non-interleaved
// (rotate-half) layout, from the inverse frequencies of `rope`'s type
// (tensor/rope.h), scaled by its attention factor, computed in fp32 and cast
// to like's dtype.
struct RopeTables {
  at::Tensor cos;
  at::Tensor sin;
};
RopeTables MakeRope(int64_t positions, int64_t head_dim, const RopeSettings& rope, const at::Tensor& like);
// x: [..., T, head_dim].
at::Tensor ApplyRope(const at::Tensor& x, const RopeTables& rope);

// The experts of one MoE layer, stacked along dim 0. The adapter tensors are
// undefined when the experts carry no LoRA.
struct ExpertBank {
  at::Tensor gate;  // [E, I, H]
  at::Tensor up;    // [E, I, H]
  at::Tensor down;  // [E, H, I]
  at::Tensor gate_a, gate_b;  // [E, r, H], [E, I, r]
  at::Tensor up_a, up_b;      // [E, r, H], [E, I, r]
  at::Tensor down_a, down_b;  // [E, r, I], [E, H, r]
  double scale = 0.0;
};

// Routing statistics of one MoE forward, for metrics.
struct MoeStats {
  int64_t experts_with_tokens = 0;
  int64_t max_load = 0;      // tokens routed to the busiest expert
  int64_t total_routed = 0;  // tokens × top-k
};

// The routing of one MoE forward: the (token, slot) pairs sorted by expert.
struct MoeRouting {
  at::Tensor token_of;     // int64 [T·k]: token of each sorted pair
  at::Tensor slot_weight;  // [T·k, 1]: its routing weight
  std::vector<int64_t> counts;  // pairs per expert [E]
};
// The routing of top-k choices: `index` [T, k] experts (of `num_experts`)
// with their weights [T, k], the pairs sorted stably by expert.
MoeRouting SortByExpert(const at::Tensor& weights, const at::Tensor& index, int64_t num_experts);
// softmax router in fp32 over all experts, top-k, optional renormalisation.
MoeRouting RouteTokens(const at::Tensor& x, const at::Tensor& router, int64_t top_k, bool norm_topk_prob);

// The experts of `experts` over `rows` grouped by expert (counts[e] rows for
// expert e, in order): one matrix product per expert with tokens.
at::Tensor RunExperts(const at::Tensor& rows, const std::vector<int64_t>& counts, const ExpertBank& experts);

// Routing statistics from per-expert counts.
MoeStats StatsOf(const std::vector<int64_t>& counts);

// Sparse MoE block: softmax router in fp32 over all experts, top-k, optional
// renormalisation, every token to its k experts (no capacity, no dropping).
// Experts are evaluated as one matrix product per expert over the tokens
// routed to it. x: [T, H].
at::Tensor MoeForward(const at::Tensor& x, const at::Tensor& router, const ExpertBank& experts,
                      int64_t top_k, bool norm_topk_prob, MoeStats* stats);

}  // namespace lathe::runtime

#endif  // LATHE_TENSOR_LAYERS_H_
