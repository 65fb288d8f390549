// GatedDeltaNetMixer: loading its cut and its forward.
#include "runtime/linear_attention.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "parallel/context_parallel.h"
#include "core/status.h"

namespace lathe::runtime {

absl::StatusOr<std::unique_ptr<GatedDeltaNetMixer>> GatedDeltaNetMixer::Load(ParamLoader& loader,
                                                                              const std::string& prefix,
                                                                              int64_t hidden,
                                                                              const LinearAttentionConfig& c,
                                                                              double eps, const ModelShard& shard) {
  const int tp = shard.tp.size(), tr = shard.tp.rank();
  if (c.num_key_heads % tp != 0 || c.num_value_heads % tp != 0) {
    return absl::InvalidArgumentError(absl::StrCat(c.num_key_heads, " linear-attention key heads and ",
                                                   c.num_value_heads, " value heads cannot be cut over tp ", tp));
  }
  std::unique_ptr<GatedDeltaNetMixer> m(new GatedDeltaNetMixer());
  GdnDims& d = m->dims_;
  d.num_k_heads = c.num_key_heads / tp;
  d.num_v_heads = c.num_value_heads / tp;
  d.head_k_dim = c.key_head_dim;
  d.head_v_dim = c.value_head_dim;
  d.conv_kernel = c.conv_kernel_size;
  d.norm_eps = eps;
  const int64_t kd = c.key_dim(), vd = c.value_dim(), conv = c.conv_dim(), h = hidden;
  const int64_t hk = d.num_k_heads, hv = d.num_v_heads, dk = c.key_head_dim, dv = c.value_head_dim;
  m->q_begin_ = tr * hk * dk;
  m->k_begin_ = kd + tr * hk * dk;
  m->v_begin_ = 2 * kd + tr * hv * dv;
  const TpCut key_rows = TpCut::Rows(tr * hk * dk, hk * dk), value_rows = TpCut::Rows(tr * hv * dv, hv * dv);
  const TpCut head_rows = TpCut::Rows(tr * hv, hv);
  // Whole on every rank, each using its own channels or heads.
  const TpCut partial = TpCut::Whole(GradSync::kTpPartial);
  const std::string p = prefix + ".";
  if (loader.full_finetune()) {
    LATHE_ASSIGN_OR_RETURN(m->qkv_whole_, loader.Tensor(p + "in_proj_qkv.weight", {conv, h}, partial));
    LATHE_ASSIGN_OR_RETURN(m->conv_whole_, loader.Tensor(p + "conv1d.weight", {conv, 1, d.conv_kernel}, partial));
  } else {
    const std::string fused = p + "in_proj_qkv";
    LATHE_ASSIGN_OR_RETURN(m->q_, loader.LinearPart(fused, conv, h, 0, p + "in_proj_q", kd, key_rows,
                                                    LoraGroup::kAttn));
    LATHE_ASSIGN_OR_RETURN(m->k_, loader.LinearPart(fused, conv, h, kd, p + "in_proj_k", kd, key_rows,
                                                    LoraGroup::kAttn));
    LATHE_ASSIGN_OR_RETURN(m->v_, loader.LinearPart(fused, conv, h, 2 * kd, p + "in_proj_v", vd, value_rows,
                                                    LoraGroup::kAttn));
    std::vector<at::Tensor> channels;
    for (auto [begin, size] : {std::pair{m->q_begin_, hk * dk}, {m->k_begin_, hk * dk}, {m->v_begin_, hv * dv}}) {
      LATHE_ASSIGN_OR_RETURN(at::Tensor part, loader.Tensor(p + "conv1d.weight", {conv, 1, d.conv_kernel},
                                                            TpCut::Rows(begin, size)));
      channels.push_back(part);
    }
    m->weights_.conv_weight = at::cat(channels, 0);
  }
  LATHE_ASSIGN_OR_RETURN(m->z_, loader.Linear(p + "in_proj_z", vd, h, value_rows, LoraGroup::kAttn));
  LATHE_ASSIGN_OR_RETURN(m->b_, loader.Linear(p + "in_proj_b", c.num_value_heads, h, head_rows, LoraGroup::kAttn));
  LATHE_ASSIGN_OR_RETURN(m->a_, loader.Linear(p + "in_proj_a", c.num_value_heads, h, head_rows, LoraGroup::kAttn));
  const TpCut heads{0, tr * hv, hv, GradSync::kTpSharded};
  LATHE_ASSIGN_OR_RETURN(m->weights_.dt_bias, loader.Tensor(p + "dt_bias", {c.num_value_heads}, heads));
  LATHE_ASSIGN_OR_RETURN(m->weights_.a_log, loader.Tensor(p + "A_log", {c.num_value_heads}, heads));
  LATHE_ASSIGN_OR_RETURN(m->weights_.norm_weight, loader.Tensor(p + "norm.weight", {dv}, partial));
  LATHE_ASSIGN_OR_RETURN(m->out_, loader.Linear(p + "out_proj", h, vd, TpCut::Cols(tr * hv * dv, hv * dv),
                                                LoraGroup::kAttn));
  if (!loader.full_finetune()) {
    m->in_.parts = {&m->q_, &m->k_, &m->v_, &m->z_, &m->b_, &m->a_};
    m->in_.Fuse();
  }
  return m;
}

void GatedDeltaNetMixer::Visit(const TensorVisitor& fn) {
  in_.Visit(fn);
  for (LoraLinear* l : {&q_, &k_, &v_, &z_, &b_, &a_, &out_}) VisitLinear(*l, fn);
  for (at::Tensor* t : {&qkv_whole_, &conv_whole_, &weights_.conv_weight, &weights_.a_log, &weights_.dt_bias,
                        &weights_.norm_weight}) {
    fn(*t);
  }
}

at::Tensor GatedDeltaNetMixer::LocalChannels(const at::Tensor& whole) const {
  const int64_t key = dims_.key_dim(), value = dims_.value_dim();
  if (whole.size(0) == dims_.conv_dim()) return whole;  // one rank holds every channel
  return at::cat({whole.narrow(0, q_begin_, key), whole.narrow(0, k_begin_, key), whole.narrow(0, v_begin_, value)},
                 0);
}

at::Tensor GatedDeltaNetMixer::Forward(const at::Tensor& x, const LayerContext& ctx, size_t layer) const {
  GdnInputs in;
  GdnWeights w = weights_;
  if (in_.defined()) {
    std::vector<at::Tensor> parts = GroupedForward(x, in_.weight, {&q_, &k_, &v_, &z_, &b_, &a_}, ctx.enter);
    in.qkv = at::cat({parts[0], parts[1], parts[2]}, 1);
    in.z = parts[3], in.b = parts[4], in.a = parts[5];
  } else {
    at::Tensor entered = ctx.enter ? ctx.enter(x) : x;
    in.qkv = Linear(entered, LocalChannels(qkv_whole_));
    in.z = z_.Forward(entered), in.b = b_.Forward(entered), in.a = a_.Forward(entered);
    w.conv_weight = LocalChannels(conv_whole_);
  }
  if (ctx.cp != nullptr) {
    // Context parallelism: the recurrence runs over whole sequences, so every
    // member gathers the projected inputs of all rows (global order), runs the
    // core on them and keeps its own rows; the backward sums the inputs'
    // gradients over the members and hands each its rows (reduce-scatter).
    const int64_t qkv = in.qkv.size(1), zd = in.z.size(1), bd = in.b.size(1);
    at::Tensor whole = parallel::GatherSequenceRows(at::cat({in.qkv, in.z, in.b, in.a}, 1), *ctx.cp, ctx.shard->cp,
                                                    /*sum_grads=*/true);
    GdnInputs all;
    all.qkv = whole.narrow(1, 0, qkv);
    all.z = whole.narrow(1, qkv, zd);
    all.b = whole.narrow(1, qkv + zd, bd);
    all.a = whole.narrow(1, qkv + zd + bd, in.a.size(1));
    at::Tensor o;
    if (whole.size(0) == 0) {
      o = (all.qkv.sum() + all.z.sum() + all.b.sum() + all.a.sum()).expand({0, dims_.value_dim()});
    } else {
      o = GatedDeltaNet(dims_, w, all, ctx.lengths);
    }
    const std::vector<int64_t>& own = ctx.cp->own();
    o = o.index_select(0, at::tensor(own, at::kLong).to(o.device()));
    return RowParallelForward(o, out_, ctx.reduce);
  }
  at::Tensor o;
  if (x.size(0) == 0) {
    // No tokens (a rank without data this round): keep the graph shape.
    o = (in.qkv.sum() + in.z.sum() + in.b.sum() + in.a.sum()).expand({0, dims_.value_dim()});
  } else if (ctx.states != nullptr) {
    std::vector<GdnState> states;
    for (SequenceState& s : *ctx.states) {
      if (s.layers.size() <= layer) s.layers.resize(layer + 1);
      const std::vector<at::Tensor>& kept = s.layers[layer];
      states.push_back(kept.empty() ? GdnInitialState(dims_, in.qkv) : GdnState{kept[0], kept[1]});
    }
    o = GatedDeltaNet(dims_, w, in, ctx.lengths, &states);
    for (size_t i = 0; i < states.size(); ++i) {
      (*ctx.states)[i].layers[layer] = {states[i].conv, states[i].recurrent};
    }
  } else {
    o = GatedDeltaNet(dims_, w, in, ctx.lengths);
  }
  return RowParallelForward(o, out_, ctx.reduce);
}

}  // namespace lathe::runtime
