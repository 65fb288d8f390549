// GatedDeltaNetMixer: loading its cut and its forward.
#include "runtime/linear_attention.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "params/blocks.h"
#include "parallel/context_parallel.h"

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
  const int64_t kd = c.key_dim();
  const int64_t hk = d.num_k_heads, hv = d.num_v_heads, dk = c.key_head_dim, dv = c.value_head_dim;
  m->q_begin_ = tr * hk * dk;
  m->k_begin_ = kd + tr * hk * dk;
  m->v_begin_ = 2 * kd + tr * hv * dv;
  // Whole on every rank, each using its own channels or heads.
  const GradSync partial = GradSync::kTpPartial;
  DescribedLoader rows(loader, params::DescribeGatedDeltaNet(prefix, hidden, c), shard);
  if (loader.full_finetune()) {
    LATHE_ASSIGN_OR_RETURN(m->qkv_whole_, rows.Tensor("in_proj_qkv", partial));
    LATHE_ASSIGN_OR_RETURN(m->conv_whole_, rows.Tensor("conv1d", partial));
  } else {
    LATHE_ASSIGN_OR_RETURN(m->q_, rows.LinearPart("in_proj_qkv", 0));
    LATHE_ASSIGN_OR_RETURN(m->k_, rows.LinearPart("in_proj_qkv", 1));
    LATHE_ASSIGN_OR_RETURN(m->v_, rows.LinearPart("in_proj_qkv", 2));
    std::vector<at::Tensor> channels;
    for (int part = 0; part < 3; ++part) {
      LATHE_ASSIGN_OR_RETURN(at::Tensor channel, rows.TensorPart("conv1d", part));
      channels.push_back(channel);
    }
    m->weights_.conv_weight = at::cat(channels, 0);
  }
  LATHE_ASSIGN_OR_RETURN(m->z_, rows.Linear("in_proj_z"));
  LATHE_ASSIGN_OR_RETURN(m->b_, rows.Linear("in_proj_b"));
  LATHE_ASSIGN_OR_RETURN(m->a_, rows.Linear("in_proj_a"));
  LATHE_ASSIGN_OR_RETURN(m->weights_.dt_bias, rows.Tensor("dt_bias"));
  LATHE_ASSIGN_OR_RETURN(m->weights_.a_log, rows.Tensor("A_log"));
  LATHE_ASSIGN_OR_RETURN(m->weights_.norm_weight, rows.Tensor("norm", partial));
  LATHE_ASSIGN_OR_RETURN(m->out_, rows.Linear("out_proj"));
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
