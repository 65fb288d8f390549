// LatentAttention: loading its cut and its forward over packed, cached or
// context-parallel sequences.
#include "runtime/latent_attention.h"

#include <ATen/ATen.h>

#include <limits>

#include "absl/strings/str_cat.h"
#include "params/blocks.h"
#include "parallel/context_parallel.h"
#include "runtime/attention.h"
#include "core/status.h"

namespace lathe::runtime {

absl::StatusOr<std::unique_ptr<LatentAttention>> LatentAttention::Load(ParamLoader& loader, const std::string& prefix,
                                                                       int64_t hidden, int64_t heads,
                                                                       const LatentAttentionConfig& c,
                                                                       const ModelShard& shard) {
  const int tp = shard.tp.size();
  if (heads % tp != 0) {
    return absl::InvalidArgumentError(absl::StrCat(heads, " attention heads cannot be cut over tp ", tp));
  }
  std::unique_ptr<LatentAttention> a(new LatentAttention());
  a->config_ = c;
  a->heads_ = heads / tp;
  // Held whole, used on every rank's heads: partial gradients.
  const GradSync partial = GradSync::kTpPartial;
  DescribedLoader rows(loader, params::DescribeLatentAttention(prefix, hidden, heads, c), shard);
  // transformers builds these two norms with its default eps, not rms_norm_eps.
  a->q_a_norm_.eps = a->kv_a_norm_.eps = 1e-6;
  if (c.q_lora_rank > 0) {
    LATHE_ASSIGN_OR_RETURN(a->q_a_, rows.Linear("q_a_proj", partial));
    LATHE_ASSIGN_OR_RETURN(a->q_a_norm_.weight, rows.Tensor("q_a_layernorm", partial));
    LATHE_ASSIGN_OR_RETURN(a->q_b_, rows.Linear("q_b_proj"));
  } else {
    LATHE_ASSIGN_OR_RETURN(a->q_, rows.Linear("q_proj"));
  }
  LATHE_ASSIGN_OR_RETURN(a->kv_a_, rows.Linear("kv_a_proj_with_mqa", partial));
  LATHE_ASSIGN_OR_RETURN(a->kv_a_norm_.weight, rows.Tensor("kv_a_layernorm", partial));
  LATHE_ASSIGN_OR_RETURN(a->kv_b_, rows.Linear("kv_b_proj"));
  LATHE_ASSIGN_OR_RETURN(a->o_, rows.Linear("o_proj"));
  return a;
}

void LatentAttention::Visit(const TensorVisitor& fn) {
  for (LoraLinear* l : {&q_a_, &q_b_, &q_, &kv_a_, &kv_b_, &o_}) VisitLinear(*l, fn);
  fn(q_a_norm_.weight);
  fn(kv_a_norm_.weight);
  if (indexer_ != nullptr) indexer_->Visit(fn);
}

absl::Status LatentAttention::SelectKeys(ParamLoader& loader, const std::string& indexer_prefix,
                                         const SparseIndexerShape& shape, int64_t layer, int64_t selection_layer,
                                         const ModelShard& shard) {
  LATHE_CHECK(config_.q_lora_rank > 0 && selection_layer <= layer);
  selection_layer_ = selection_layer;
  if (selection_layer != layer) return absl::OkStatus();
  LATHE_ASSIGN_OR_RETURN(SparseIndexer indexer, SparseIndexer::Load(loader, indexer_prefix, shape, shard));
  indexer_ = std::make_unique<SparseIndexer>(std::move(indexer));
  return absl::OkStatus();
}

std::vector<KeySelection> LatentAttention::Selection(const at::Tensor& x, const at::Tensor& q_resid,
                                                   const LayerContext& ctx, size_t layer) const {
  LATHE_CHECK(ctx.selections != nullptr);
  if (indexer_ != nullptr) {
    std::vector<KeySelection> chosen = indexer_->Select(x, q_resid, ctx, layer);
    (*ctx.selections)[layer] = chosen;
    return chosen;
  }
  auto it = ctx.selections->find(static_cast<size_t>(selection_layer_));
  LATHE_CHECK(it != ctx.selections->end());
  return it->second;
}

at::Tensor LatentAttention::Rope(const at::Tensor& x, const RopeTables& rope) const {
  if (!config_.rope_interleave) return ApplyRope(x, rope);
  // Pairs (x0, x1), (x2, x3), ... rotate together: as halves [x0 x2 ... | x1
  // x3 ...], the order transformers' interleaved rotation leaves them in.
  const int64_t r = x.size(-1);
  return ApplyRope(x.unflatten(-1, {r / 2, 2}).transpose(-1, -2).flatten(-2), rope);
}

at::Tensor LatentAttention::Decode(const at::Tensor& q, const at::Tensor& latent, const at::Tensor& k_rope,
                                   const std::vector<KeySelection>& selections, const LayerContext& ctx,
                                   size_t layer) const {
  const LatentAttentionConfig& c = config_;
  const int64_t nope = c.qk_nope_head_dim, r = c.qk_rope_head_dim, dv = c.v_head_dim, rank = c.kv_lora_rank;
  // kv_b_proj per head: [key nope rows | value rows] over the latent.
  at::Tensor kv_b = kv_b_.weight.view({heads_, nope + dv, rank});
  at::Tensor w_key = kv_b.narrow(1, 0, nope), w_value = kv_b.narrow(1, nope, dv);
  std::vector<at::Tensor> parts;
  int64_t offset = 0;
  for (size_t i = 0; i < ctx.lengths.size(); ++i) {
    const int64_t n = ctx.lengths[i];
    SequenceState& state = (*ctx.states)[i];
    if (state.layers.size() <= layer) state.layers.resize(layer + 1);
    std::vector<at::Tensor>& slot = state.layers[layer];
    // Fresh copies: the products below then see the same operands (layout
    // and alignment) whatever the sequence's place in the batch.
    at::Tensor ln = latent.narrow(0, offset, n).clone(), rn = k_rope.narrow(0, offset, n).clone();
    // Slots 0 and 1; a sparse attention's indexer keeps its keys in slot 2.
    if (slot.size() < 2) slot.resize(2);
    const int64_t past = slot[0].defined() ? slot[0].size(0) : 0;
    at::Tensor all_latent = past > 0 ? at::cat({slot[0], ln}, 0) : ln;  // [past + n, rank]
    at::Tensor all_rope = past > 0 ? at::cat({slot[1], rn}, 0) : rn;    // [past + n, r]
    slot[0] = all_latent;
    slot[1] = all_rope;
    at::Tensor qn = q.narrow(1, offset, n).clone(at::MemoryFormat::Contiguous);  // [h, n, qk]
    // q·k = (q_nope·W_key)·latent + q_rope·k_rope: the key weights absorbed
    // into the query, so no key or value is ever expanded per head.
    at::Tensor q_latent = at::bmm(qn.narrow(2, 0, nope), w_key);  // [h, n, rank]
    at::Tensor scores = at::matmul(q_latent, all_latent.t()) + at::matmul(qn.narrow(2, nope, r), all_rope.t());
    // New token j sees the past and the new tokens up to itself.
    at::Tensor mask = i < selections.size() ? KeyMask(selections[i], q.device()) : at::Tensor();
    if (!mask.defined()) {
      mask = at::ones({n, past + n}, at::TensorOptions().dtype(at::kBool).device(q.device())).tril(past);
    }
    scores = scores.mul(c.softmax_scale).masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
    at::Tensor weights = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
    // Σ p·v = W_value·(Σ p·latent): the value weights applied after the sum.
    at::Tensor o_latent = at::matmul(weights, all_latent);     // [h, n, rank]
    parts.push_back(at::bmm(o_latent, w_value.transpose(1, 2)));  // [h, n, dv]
    offset += n;
  }
  return parts.size() == 1 ? parts[0] : at::cat(parts, 1);
}

at::Tensor LatentAttention::Forward(const at::Tensor& x, const LayerContext& ctx, size_t layer) const {
  const LatentAttentionConfig& c = config_;
  const int64_t t = x.size(0), nope = c.qk_nope_head_dim, r = c.qk_rope_head_dim, dv = c.v_head_dim;
  at::Tensor in = ctx.enter ? ctx.enter(x) : x;
  // q_proj is column-parallel with a replicated adapter A: GroupedForward
  // enters the adapter's rank-sized input too, so A's gradient is complete.
  at::Tensor q_resid = c.q_lora_rank > 0 ? q_a_norm_(q_a_.Forward(in)) : at::Tensor();
  at::Tensor q = c.q_lora_rank > 0 ? q_b_.Forward(q_resid) : GroupedForward(x, q_.weight, {&q_}, ctx.enter)[0];
  q = q.reshape({t, heads_, nope + r}).transpose(0, 1);  // [h, T, qk]
  at::Tensor compressed = kv_a_.Forward(in);
  at::Tensor latent = kv_a_norm_(compressed.narrow(1, 0, c.kv_lora_rank));
  std::vector<KeySelection> selections;
  // Under cp a member without rows still takes part in the indexer's gather.
  if (selection_layer_ >= 0 && (t > 0 || ctx.cp != nullptr)) selections = Selection(x, q_resid, ctx, layer);
  if (ctx.states != nullptr && t > 0) {
    at::Tensor q_rope = Rope(q.narrow(2, nope, r), ctx.rope);
    at::Tensor k_rope = Rope(compressed.narrow(1, c.kv_lora_rank, r), ctx.rope);  // [T, r]
    at::Tensor o = Decode(at::cat({q.narrow(2, 0, nope), q_rope}, 2), latent, k_rope, selections, ctx, layer);
    return RowParallelForward(o.transpose(0, 1).reshape({t, heads_ * dv}), o_, ctx.reduce);
  }
  at::Tensor kv = kv_b_.Forward(latent).reshape({t, heads_, nope + dv}).transpose(0, 1);
  at::Tensor v = kv.narrow(2, nope, dv);
  if (t == 0 && ctx.cp == nullptr) {
    // No tokens (a rank without data this round): keep the graph shape.
    at::Tensor o = (q.sum() + kv.sum() + compressed.sum()).expand({0, heads_ * dv});
    return RowParallelForward(o, o_, ctx.reduce);
  }
  at::Tensor k_rope = compressed.narrow(1, c.kv_lora_rank, r).unsqueeze(0);  // [1, T, r]
  at::Tensor q_rope = q.narrow(2, nope, r);
  if (t > 0) k_rope = Rope(k_rope, ctx.rope), q_rope = Rope(q_rope, ctx.rope);
  q = at::cat({q.narrow(2, 0, nope), q_rope}, 2);
  at::Tensor k = at::cat({kv.narrow(2, 0, nope), k_rope.expand({heads_, t, r})}, 2);
  at::Tensor o;
  if (ctx.cp != nullptr) {
    // Each chunk's mask is built from its selection just before its attention.
    const at::Device device = q.device();
    o = parallel::ContextParallelAttention(q, k, v, *ctx.cp, c.softmax_scale, /*gqa=*/false, ctx.shard->cp,
                                           [&selections, device](size_t i) {
                                             return i < selections.size() ? KeyMask(selections[i], device)
                                                                          : at::Tensor();
                                           });
  } else if (!selections.empty()) {
    o = SelectedAttention(q, k, v, ctx.lengths, selections, c.softmax_scale);
  } else {
    // SDPA's fused (flash) kernel needs the values as wide as q and k; without
    // it the T x T scores are materialised. Zero columns appended to the
    // values give zero output columns, dropped again: the same attention.
    const int64_t pad = (nope + r) - dv;
    o = PackedAttention(q, k, pad > 0 ? at::constant_pad_nd(v, {0, pad}) : v, ctx.lengths, c.softmax_scale,
                        /*gqa=*/false);
    if (pad > 0) o = o.narrow(2, 0, dv);
  }
  return RowParallelForward(o.transpose(0, 1).reshape({t, heads_ * dv}), o_, ctx.reduce);
}

}  // namespace lathe::runtime
