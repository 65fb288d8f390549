// GqaAttention: loading its cut and its forward over packed, cached or
// context-parallel sequences.
#include "runtime/attention.h"

#include <ATen/ATen.h>

#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "params/blocks.h"
#include "parallel/context_parallel.h"

namespace lathe::runtime {

at::Tensor PackedAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::vector<int64_t>& lengths, double scale, bool gqa) {
  if (lengths.size() == 1) {
    return at::scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), {}, 0.0,
                                            /*is_causal=*/true, scale, gqa).squeeze(0);
  }
  std::vector<at::Tensor> parts;
  int64_t offset = 0;
  for (int64_t n : lengths) {
    parts.push_back(at::scaled_dot_product_attention(
        q.narrow(1, offset, n).unsqueeze(0), k.narrow(1, offset, n).unsqueeze(0),
        v.narrow(1, offset, n).unsqueeze(0), {}, 0.0, /*is_causal=*/true, scale, gqa).squeeze(0));
    offset += n;
  }
  return at::cat(parts, 1);
}

namespace {

// Attention of packed sequences that continue their states: q [nH, T, D],
// k and v [nKV, T, D] (the new tokens); appends k, v to each state's slot
// for `layer`.
at::Tensor CachedAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::vector<int64_t>& lengths, double scale, bool gqa, size_t layer,
                           std::vector<SequenceState>& states) {
  std::vector<at::Tensor> parts;
  int64_t offset = 0;
  for (size_t i = 0; i < lengths.size(); ++i) {
    const int64_t n = lengths[i];
    SequenceState& state = states[i];
    if (state.layers.size() <= layer) state.layers.resize(layer + 1);
    std::vector<at::Tensor>& kv = state.layers[layer];
    at::Tensor kn = k.narrow(1, offset, n), vn = v.narrow(1, offset, n);
    const int64_t past = kv.empty() ? 0 : kv[0].size(1);
    at::Tensor ka = past > 0 ? at::cat({kv[0], kn}, 1) : kn;
    at::Tensor va = past > 0 ? at::cat({kv[1], vn}, 1) : vn;
    kv = {ka, va};
    // New token j sees the past and the new tokens up to itself.
    at::Tensor mask = at::ones({n, past + n}, at::TensorOptions().dtype(at::kBool).device(q.device()))
                          .tril(past);
    parts.push_back(at::scaled_dot_product_attention(q.narrow(1, offset, n).unsqueeze(0), ka.unsqueeze(0),
                                                     va.unsqueeze(0), mask, 0.0, /*is_causal=*/false, scale, gqa)
                        .squeeze(0));
    offset += n;
  }
  return at::cat(parts, 1);
}

}  // namespace

absl::StatusOr<std::unique_ptr<GqaAttention>> GqaAttention::Load(ParamLoader& loader, const std::string& prefix,
                                                                 const AttentionShape& s, const ModelShard& shard) {
  const int tp = shard.tp.size();
  if (s.heads % tp != 0 || (s.kv_heads % tp != 0 && tp % s.kv_heads != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(s.heads, " attention heads and ", s.kv_heads,
                                                   " key/value heads cannot be cut over tp ", tp));
  }
  std::unique_ptr<GqaAttention> a(new GqaAttention());
  a->shape_ = s;
  a->heads_ = s.heads / tp;
  a->kv_heads_ = s.kv_heads < tp ? 1 : s.kv_heads / tp;  // fewer KV heads than ranks: each rank holds one
  const params::GqaDims dims{s.hidden, s.heads, s.kv_heads, s.head_dim, s.qk_norm, s.output_gate, s.qkv_bias, s.o_bias};
  DescribedLoader rows(loader, params::DescribeGqa(prefix, dims), shard);
  LATHE_ASSIGN_OR_RETURN(a->q_, rows.Linear("q_proj"));
  LATHE_ASSIGN_OR_RETURN(a->k_, rows.Linear("k_proj"));
  LATHE_ASSIGN_OR_RETURN(a->v_, rows.Linear("v_proj"));
  LATHE_ASSIGN_OR_RETURN(a->o_, rows.Linear("o_proj"));
  if (s.qkv_bias) {
    LATHE_ASSIGN_OR_RETURN(a->q_.bias, rows.Tensor("q_proj.bias"));
    LATHE_ASSIGN_OR_RETURN(a->k_.bias, rows.Tensor("k_proj.bias"));
    LATHE_ASSIGN_OR_RETURN(a->v_.bias, rows.Tensor("v_proj.bias"));
  }
  if (s.o_bias) {
    LATHE_ASSIGN_OR_RETURN(a->o_.bias, rows.Tensor("o_proj.bias"));
  }
  if (s.qk_norm) {
    // Applied per head, each tp rank to its own heads: a partial gradient.
    a->q_norm_.eps = a->k_norm_.eps = s.eps;
    a->q_norm_.offset = a->k_norm_.offset = s.norm_offset;
    LATHE_ASSIGN_OR_RETURN(a->q_norm_.weight, rows.Tensor("q_norm", GradSync::kTpPartial));
    LATHE_ASSIGN_OR_RETURN(a->k_norm_.weight, rows.Tensor("k_norm", GradSync::kTpPartial));
  }
  if (!loader.full_finetune()) {
    a->qkv_.parts = {&a->q_, &a->k_, &a->v_};
    a->qkv_.Fuse();
  }
  return a;
}

void GqaAttention::Visit(const TensorVisitor& fn) {
  qkv_.Visit(fn);
  for (LoraLinear* l : {&q_, &k_, &v_, &o_}) VisitLinear(*l, fn);
  fn(q_norm_.weight);
  fn(k_norm_.weight);
}

at::Tensor GqaAttention::Forward(const at::Tensor& x, const LayerContext& ctx, size_t layer) const {
  const int64_t t = x.size(0), d = shape_.head_dim;
  const double softmax_scale = 1.0 / std::sqrt(static_cast<double>(d));
  const bool gqa = heads_ != kv_heads_;
  const int64_t q_width = heads_ * d;
  at::Tensor q, k, v;
  if (qkv_.defined()) {
    auto qkv = GroupedForward(x, qkv_.weight, {&q_, &k_, &v_}, ctx.enter);
    q = qkv[0], k = qkv[1], v = qkv[2];
  } else {
    at::Tensor in = ctx.enter ? ctx.enter(x) : x;
    q = q_.Forward(in), k = k_.Forward(in), v = v_.Forward(in);
  }
  at::Tensor gate;
  if (shape_.output_gate) {
    q = q.reshape({t, heads_, 2 * d});
    gate = q.narrow(2, d, d).reshape({t, q_width});
    q = q.narrow(2, 0, d);
  } else {
    q = q.reshape({t, heads_, d});
  }
  k = k.reshape({t, kv_heads_, d});
  v = v.reshape({t, kv_heads_, d});
  if (shape_.qk_norm) {
    q = q_norm_(q);
    k = k_norm_(k);
  }
  const int64_t rotary = shape_.rotary_dim > 0 ? shape_.rotary_dim : d;
  auto rope = [&](const at::Tensor& x) {
    if (rotary == d) return ApplyRope(x, ctx.rope);
    return at::cat({ApplyRope(x.narrow(-1, 0, rotary), ctx.rope), x.narrow(-1, rotary, d - rotary)}, -1);
  };
  at::Tensor o;
  if (ctx.cp != nullptr) {
    q = t > 0 ? rope(q.transpose(0, 1)) : q.transpose(0, 1);
    k = t > 0 ? rope(k.transpose(0, 1)) : k.transpose(0, 1);
    o = parallel::ContextParallelAttention(q, k, v.transpose(0, 1), *ctx.cp, softmax_scale, gqa, ctx.shard->cp);
    o = o.transpose(0, 1).reshape({t, q_width});
  } else if (t > 0) {
    q = rope(q.transpose(0, 1));
    k = rope(k.transpose(0, 1));
    o = ctx.states != nullptr
            ? CachedAttention(q, k, v.transpose(0, 1), ctx.lengths, softmax_scale, gqa, layer, *ctx.states)
            : PackedAttention(q, k, v.transpose(0, 1), ctx.lengths, softmax_scale, gqa);
    o = o.transpose(0, 1).reshape({t, q_width});
  } else {
    // No tokens (a rank without data this round): keep the graph shape.
    o = (q.sum() + k.sum() + v.sum()).expand({0, q_width});
  }
  if (gate.defined()) o = o * at::sigmoid(gate);
  return RowParallelForward(o, o_, ctx.reduce);
}

}  // namespace lathe::runtime
