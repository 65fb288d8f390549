// Loading, LoRA attachment and the forward pass of DecoderModel.
#include "runtime/decoder_model.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "parallel/expert_parallel.h"
#include "runtime/losses.h"
#include "runtime/recompute.h"
#include "runtime/status.h"
#include "runtime/weight_source.h"

namespace lathe::runtime {

void ForEachNamed(const TrainableParam& p, const at::Tensor& value,
                  const std::function<void(const std::string&, const at::Tensor&)>& fn) {
  if (!p.per_expert) {
    fn(p.name, value);
    return;
  }
  const int64_t first = p.shard_dim == 0 ? p.shard_begin : 0;
  for (int64_t e = 0; e < value.size(0); ++e) {
    fn(absl::StrReplaceAll(p.name, {{"{e}", absl::StrCat(first + e)}}), value.select(0, e));
  }
}

void FoldComputeGradients(std::vector<TrainableParam>& params) {
  at::NoGradGuard no_grad;
  for (TrainableParam& p : params) {
    if (!p.compute.defined() || !p.compute.grad().defined()) continue;
    at::Tensor g = p.compute.grad().to(at::kFloat);
    p.compute.mutable_grad() = at::Tensor();
    if (p.tensor.grad().defined()) {
      p.tensor.mutable_grad().add_(g);
    } else {
      p.tensor.mutable_grad() = g;
    }
  }
}

void RefreshComputeCopies(std::vector<TrainableParam>& params) {
  at::NoGradGuard no_grad;
  for (TrainableParam& p : params) {
    if (p.compute.defined()) p.compute.copy_(p.tensor);
  }
}

// How a linear layer is cut over tp: by output rows (column-parallel) or by
// input columns (row-parallel), at `begin` of `full`.
struct DecoderModel::Cut {
  enum Kind { kColumn, kRow } kind = kColumn;
  int64_t begin = 0;
  int64_t full = 0;
  bool kv_shared = false;
};

absl::StatusOr<std::unique_ptr<DecoderModel>> DecoderModel::Load(const std::string& dir,
                                                                 const LoraSettings& lora,
                                                                 const ModelShard& shard, Dtype dtype) {
  std::unique_ptr<DecoderModel> model(new DecoderModel());
  LATHE_ASSIGN_OR_RETURN(model->config_, LoadModelConfig(dir));
  model->lora_ = lora;
  model->shard_ = shard;
  model->dtype_ = dtype;
  LATHE_ASSIGN_OR_RETURN(WeightSource source,
                         WeightSource::Open(dir, dtype == Dtype::kBFloat16 ? at::kBFloat16 : at::kFloat));
  LATHE_RETURN_IF_ERROR(model->Build(source));
  model->MoveToDevice();
  return model;
}

absl::Status DecoderModel::Build(const WeightSource& w) {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size, d = c.head_dim;
  const int tp = shard_.tp.size(), tr = shard_.tp.rank();
  if (c.num_attention_heads % tp != 0 || (c.num_key_value_heads % tp != 0 && tp % c.num_key_value_heads != 0) ||
      (c.HasDenseMlp() && c.intermediate_size % tp != 0) || c.num_experts % shard_.ep.size() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("model ", c.architecture, " cannot be cut over tp ", tp,
                                                   " and ep ", shard_.ep.size()));
  }
  vocab_begin_ = parallel::PartBegin(c.vocab_size, tp, tr);
  const int64_t vocab_local = parallel::PartBegin(c.vocab_size, tp, tr + 1) - vocab_begin_;
  heads_ = c.num_attention_heads / tp;
  kv_shared_ = c.num_key_value_heads < tp;
  kv_heads_ = kv_shared_ ? 1 : c.num_key_value_heads / tp;
  kv_begin_ = kv_shared_ ? tr / (tp / c.num_key_value_heads) : tr * kv_heads_;
  const int64_t inter_local = c.intermediate_size / tp;
  inter_begin_ = tr * inter_local;
  const int64_t experts_local = c.num_experts / shard_.ep.size();
  expert_begin_ = shard_.ep.rank() * experts_local;
  const Slice vocab{0, vocab_begin_, vocab_local}, q_rows{0, tr * heads_ * d, heads_ * d},
      kv_rows{0, kv_begin_ * d, kv_heads_ * d}, o_cols{1, tr * heads_ * d, heads_ * d},
      mlp_rows{0, inter_begin_, inter_local}, mlp_cols{1, inter_begin_, inter_local};

  LATHE_ASSIGN_OR_RETURN(embed_, w.Take("model.embed_tokens.weight", {c.vocab_size, h}, vocab));
  LATHE_ASSIGN_OR_RETURN(final_norm_, w.Take("model.norm.weight", {h}));
  if (c.tie_word_embeddings) {
    lm_head_.weight = embed_;
  } else {
    LATHE_ASSIGN_OR_RETURN(lm_head_.weight, w.Take("lm_head.weight", {c.vocab_size, h}, vocab));
  }
  layers_.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    DecoderLayer& l = layers_[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LATHE_ASSIGN_OR_RETURN(l.input_norm, w.Take(p + "input_layernorm.weight", {h}));
    LATHE_ASSIGN_OR_RETURN(l.post_norm, w.Take(p + "post_attention_layernorm.weight", {h}));
    LATHE_ASSIGN_OR_RETURN(l.q.weight, w.Take(p + "self_attn.q_proj.weight", {c.q_dim(), h}, q_rows));
    LATHE_ASSIGN_OR_RETURN(l.k.weight, w.Take(p + "self_attn.k_proj.weight", {c.kv_dim(), h}, kv_rows));
    LATHE_ASSIGN_OR_RETURN(l.v.weight, w.Take(p + "self_attn.v_proj.weight", {c.kv_dim(), h}, kv_rows));
    LATHE_ASSIGN_OR_RETURN(l.o.weight, w.Take(p + "self_attn.o_proj.weight", {h, c.q_dim()}, o_cols));
    if (c.qk_norm) {
      LATHE_ASSIGN_OR_RETURN(l.q_norm, w.Take(p + "self_attn.q_norm.weight", {d}));
      LATHE_ASSIGN_OR_RETURN(l.k_norm, w.Take(p + "self_attn.k_norm.weight", {d}));
    }
    l.moe = c.IsMoeLayer(i);
    if (l.moe) {
      const int64_t inter = c.moe_intermediate_size;
      LATHE_ASSIGN_OR_RETURN(l.router, w.Take(p + "mlp.gate.weight", {c.num_experts, h}));
      LATHE_ASSIGN_OR_RETURN(auto experts, w.TakeExperts(p + "mlp", c.num_experts, inter, h, expert_begin_,
                                                         experts_local));
      l.experts.gate = experts.gate;
      l.experts.up = experts.up;
      l.experts.down = experts.down;
    } else {
      const int64_t inter = c.intermediate_size;
      LATHE_ASSIGN_OR_RETURN(l.gate.weight, w.Take(p + "mlp.gate_proj.weight", {inter, h}, mlp_rows));
      LATHE_ASSIGN_OR_RETURN(l.up.weight, w.Take(p + "mlp.up_proj.weight", {inter, h}, mlp_rows));
      LATHE_ASSIGN_OR_RETURN(l.down.weight, w.Take(p + "mlp.down_proj.weight", {h, inter}, mlp_cols));
    }
  }
  if (lora_.full_finetune()) {
    RegisterFull();
    return absl::OkStatus();
  }
  const Cut q_cut{Cut::kColumn, tr * heads_ * d, c.q_dim()}, kv_cut{Cut::kColumn, kv_begin_ * d, c.kv_dim(), kv_shared_},
      o_cut{Cut::kRow, tr * heads_ * d, c.q_dim()}, up_cut{Cut::kColumn, inter_begin_, c.intermediate_size},
      down_cut{Cut::kRow, inter_begin_, c.intermediate_size}, vocab_cut{Cut::kColumn, vocab_begin_, c.vocab_size};
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(lora_.seed);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    DecoderLayer& l = layers_[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    AttachLora(l.q, p + "self_attn.q_proj", lora_.train_attn, gen, q_cut);
    AttachLora(l.k, p + "self_attn.k_proj", lora_.train_attn, gen, kv_cut);
    AttachLora(l.v, p + "self_attn.v_proj", lora_.train_attn, gen, kv_cut);
    AttachLora(l.o, p + "self_attn.o_proj", lora_.train_attn, gen, o_cut);
    if (l.moe && lora_.train_mlp) {
      AttachExpertLora(l.experts, p + "mlp.experts.{e}", gen);
    } else if (!l.moe) {
      AttachLora(l.gate, p + "mlp.gate_proj", lora_.train_mlp, gen, up_cut);
      AttachLora(l.up, p + "mlp.up_proj", lora_.train_mlp, gen, up_cut);
      AttachLora(l.down, p + "mlp.down_proj", lora_.train_mlp, gen, down_cut);
    }
  }
  AttachLora(lm_head_, "lm_head", lora_.train_unembed, gen, vocab_cut);
  FuseFrozenWeights();
  return absl::OkStatus();
}

void DecoderModel::FuseFrozenWeights() {
  auto fuse = [](std::vector<LoraLinear*> parts) {
    std::vector<at::Tensor> weights;
    for (LoraLinear* p : parts) weights.push_back(p->weight);
    at::Tensor fused = at::cat(weights, 0);
    int64_t offset = 0;
    for (LoraLinear* p : parts) {
      int64_t rows = p->weight.size(0);
      p->weight = fused.narrow(0, offset, rows);
      offset += rows;
    }
    return fused;
  };
  for (DecoderLayer& l : layers_) {
    l.qkv_weight = fuse({&l.q, &l.k, &l.v});
    if (!l.moe) l.gate_up_weight = fuse({&l.gate, &l.up});
  }
}

namespace {

// PEFT's default: A ~ kaiming_uniform(a=√5), i.e. U(±1/√fan_in); B = 0.
// Drawn at full size so every layout starts from the same adapter.
at::Tensor LoraA(std::vector<int64_t> shape, at::Generator& gen) {
  double bound = 1.0 / std::sqrt(static_cast<double>(shape.back()));
  return at::empty(shape, at::kFloat).uniform_(-bound, bound, gen);
}

at::Tensor LoraB(std::vector<int64_t> shape) {
  return at::zeros(shape, at::kFloat).requires_grad_(true);
}

}  // namespace

void DecoderModel::AttachLora(LoraLinear& layer, const std::string& prefix, bool enabled, at::Generator& gen,
                              const Cut& cut) {
  if (!enabled) return;
  const int64_t r = lora_.rank;
  const bool row = cut.kind == Cut::kRow;
  layer.lora_a = LoraA({r, row ? cut.full : layer.weight.size(1)}, gen);
  if (row) layer.lora_a = layer.lora_a.narrow(1, cut.begin, layer.weight.size(1)).contiguous();
  layer.lora_a.requires_grad_(true);
  layer.lora_b = LoraB({layer.weight.size(0), r});
  layer.scale = lora_.scale();
  TrainableParam a{prefix + ".lora_A.weight", layer.lora_a};
  TrainableParam b{prefix + ".lora_B.weight", layer.lora_b};
  if (row) {
    a.sync = GradSync::kTpSharded, a.shard_dim = 1, a.shard_begin = cut.begin, a.full_size = cut.full;
  } else {
    b.sync = cut.kv_shared ? GradSync::kKvShared : GradSync::kTpSharded;
    b.shard_dim = 0, b.shard_begin = cut.begin, b.full_size = cut.full;
  }
  trainable_.push_back(a);
  trainable_.push_back(b);
}

void DecoderModel::AttachExpertLora(ExpertBank& bank, const std::string& prefix, at::Generator& gen) {
  const int64_t r = lora_.rank;
  const int64_t e = bank.gate.size(0), inter = bank.gate.size(1), h = bank.gate.size(2);
  const int64_t all = config_.num_experts;
  bank.scale = lora_.scale();
  auto add = [&](at::Tensor& a, at::Tensor& b, const char* proj, int64_t in, int64_t out) {
    a = LoraA({all, r, in}, gen).narrow(0, expert_begin_, e).contiguous().requires_grad_(true);
    b = LoraB({e, out, r});
    for (auto [t, kind] : {std::pair{&a, "lora_A"}, {&b, "lora_B"}}) {
      trainable_.push_back({absl::StrCat(prefix, ".", proj, ".", kind, ".weight"), *t, true, GradSync::kExpert,
                            0, expert_begin_, all});
    }
  };
  add(bank.gate_a, bank.gate_b, "gate_proj", h, inter);
  add(bank.up_a, bank.up_b, "up_proj", h, inter);
  add(bank.down_a, bank.down_b, "down_proj", inter, h);
}

void DecoderModel::RegisterFull() {
  const ModelConfig& c = config_;
  auto add = [&](const std::string& name, at::Tensor& t, GradSync sync = GradSync::kReplicated, int dim = -1,
                 int64_t begin = 0, int64_t full = 0) {
    t.requires_grad_(true);
    if (t.scalar_type() == at::kFloat) {
      trainable_.push_back({name, t, sync == GradSync::kExpert, sync, dim, begin, full});
      return;
    }
    // A bf16 weight trains through its fp32 master (exact: bf16 widens losslessly).
    at::Tensor master = t.detach().to(at::kFloat).requires_grad_(true);
    trainable_.push_back({name, master, sync == GradSync::kExpert, sync, dim, begin, full, t});
  };
  const int64_t d = c.head_dim;
  const int tr = shard_.tp.rank();
  const GradSync kv_sync = kv_shared_ ? GradSync::kKvShared : GradSync::kTpSharded;
  add("model.embed_tokens.weight", embed_, GradSync::kTpSharded, 0, vocab_begin_, c.vocab_size);
  for (size_t i = 0; i < layers_.size(); ++i) {
    DecoderLayer& l = layers_[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    add(p + "input_layernorm.weight", l.input_norm);
    add(p + "self_attn.q_proj.weight", l.q.weight, GradSync::kTpSharded, 0, tr * heads_ * d, c.q_dim());
    add(p + "self_attn.k_proj.weight", l.k.weight, kv_sync, 0, kv_begin_ * d, c.kv_dim());
    add(p + "self_attn.v_proj.weight", l.v.weight, kv_sync, 0, kv_begin_ * d, c.kv_dim());
    add(p + "self_attn.o_proj.weight", l.o.weight, GradSync::kTpSharded, 1, tr * heads_ * d, c.q_dim());
    if (l.q_norm.defined()) {
      add(p + "self_attn.q_norm.weight", l.q_norm, GradSync::kTpPartial);
      add(p + "self_attn.k_norm.weight", l.k_norm, GradSync::kTpPartial);
    }
    add(p + "post_attention_layernorm.weight", l.post_norm);
    if (l.moe) {
      // Each tp rank routes its own part of the tokens.
      add(p + "mlp.gate.weight", l.router, GradSync::kTpPartial);
      for (auto [proj, t] : {std::pair{"gate_proj", &l.experts.gate}, {"up_proj", &l.experts.up},
                             {"down_proj", &l.experts.down}}) {
        add(absl::StrCat(p, "mlp.experts.{e}.", proj, ".weight"), *t, GradSync::kExpert, 0, expert_begin_,
            c.num_experts);
      }
    } else {
      add(p + "mlp.gate_proj.weight", l.gate.weight, GradSync::kTpSharded, 0, inter_begin_, c.intermediate_size);
      add(p + "mlp.up_proj.weight", l.up.weight, GradSync::kTpSharded, 0, inter_begin_, c.intermediate_size);
      add(p + "mlp.down_proj.weight", l.down.weight, GradSync::kTpSharded, 1, inter_begin_, c.intermediate_size);
    }
  }
  add("model.norm.weight", final_norm_);
  if (!c.tie_word_embeddings) {
    add("lm_head.weight", lm_head_.weight, GradSync::kTpSharded, 0, vocab_begin_, c.vocab_size);
  }
}

parallel::Group DecoderModel::MoeStatsGroup() const { return shard_.ep.active() ? shard_.ep : shard_.tp; }

namespace {

// Causal attention of packed sequences; q [nH, T, D], k and v [nKV, T, D].
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

// RoPE rows of packed sequences whose positions start at `starts` (0 without).
RopeTables PackedRope(const std::vector<int64_t>& lengths, int64_t head_dim, double theta, const at::Tensor& like,
                      const std::vector<int64_t>& starts = {}) {
  int64_t longest = 0;
  for (size_t i = 0; i < lengths.size(); ++i) longest = std::max(longest, (starts.empty() ? 0 : starts[i]) + lengths[i]);
  RopeTables rope = MakeRope(longest, head_dim, theta, like);
  if (lengths.size() == 1 && starts.empty()) return rope;
  std::vector<at::Tensor> positions;
  const auto opts = at::TensorOptions().dtype(at::kLong).device(like.device());
  for (size_t i = 0; i < lengths.size(); ++i) {
    const int64_t s = starts.empty() ? 0 : starts[i];
    positions.push_back(at::arange(s, s + lengths[i], opts));
  }
  at::Tensor index = at::cat(positions);
  return {rope.cos.index_select(0, index), rope.sin.index_select(0, index)};
}

// RoPE rows for tokens at the given positions of their sequences.
RopeTables GlobalRope(const std::vector<int64_t>& positions, int64_t head_dim, double theta, const at::Tensor& like) {
  const int64_t longest = *std::max_element(positions.begin(), positions.end()) + 1;
  RopeTables rope = MakeRope(longest, head_dim, theta, like);
  at::Tensor index = at::tensor(positions, at::TensorOptions().dtype(at::kLong)).to(like.device());
  return {rope.cos.index_select(0, index), rope.sin.index_select(0, index)};
}

// Attention of packed sequences that continue their caches: q [nH, T, D],
// k and v [nKV, T, D] (the new tokens); appends k, v to each cache.
at::Tensor CachedAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::vector<int64_t>& lengths, double scale, bool gqa, size_t layer,
                           std::vector<KvCache>& caches) {
  std::vector<at::Tensor> parts;
  int64_t offset = 0;
  for (size_t i = 0; i < lengths.size(); ++i) {
    const int64_t n = lengths[i];
    KvCache& cache = caches[i];
    at::Tensor kn = k.narrow(1, offset, n), vn = v.narrow(1, offset, n);
    const int64_t past = cache.k.size() > layer ? cache.k[layer].size(1) : 0;
    at::Tensor ka = past > 0 ? at::cat({cache.k[layer], kn}, 1) : kn;
    at::Tensor va = past > 0 ? at::cat({cache.v[layer], vn}, 1) : vn;
    if (cache.k.size() <= layer) cache.k.resize(layer + 1), cache.v.resize(layer + 1);
    cache.k[layer] = ka, cache.v[layer] = va;
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

// What every layer of one Hidden() call shares.
struct DecoderModel::LayerPass {
  std::vector<int64_t> lengths;
  RopeTables rope;
  RegionFn enter, reduce;
  std::vector<KvCache>* caches = nullptr;
  // Context parallelism: this rank's rows (shared, so a recomputed layer
  // finds them after Hidden returned).
  std::shared_ptr<const parallel::SequenceSplit> cp;
};

at::Tensor DecoderModel::Hidden(const at::Tensor& tokens, const std::vector<int64_t>& lengths,
                                std::vector<MoeStats>* moe_stats, std::vector<KvCache>* caches,
                                bool recompute, const parallel::SequenceSplit* split) const {
  const ModelConfig& c = config_;
  const int64_t t = tokens.size(0);
  const parallel::Group& tp = shard_.tp;
  LayerPass pass;
  pass.lengths = lengths;
  pass.caches = caches;
  if (tp.active()) {
    pass.enter = [&tp](const at::Tensor& x) { return parallel::CopyToGroup(x, tp); };
    pass.reduce = [&tp](const at::Tensor& x) { return parallel::ReduceFromGroup(x, tp); };
  }
  at::Tensor h;
  if (tp.active()) {
    // Vocabulary-parallel lookup: rows outside this rank's part are zero.
    at::Tensor local = tokens - vocab_begin_;
    at::Tensor mine = local.ge(0).logical_and(local.lt(embed_.size(0)));
    at::Tensor rows = embed_.index_select(0, local.masked_fill(mine.logical_not(), 0));
    h = pass.reduce(rows * mine.unsqueeze(1).to(rows.scalar_type()));
  } else {
    h = embed_.index_select(0, tokens);
  }
  std::vector<int64_t> starts;
  if (caches != nullptr) {
    for (const KvCache& cache : *caches) starts.push_back(cache.length());
  }
  if (split != nullptr && caches == nullptr) {
    pass.cp = std::make_shared<const parallel::SequenceSplit>(*split);
    if (t > 0) pass.rope = GlobalRope(split->positions, c.head_dim, c.rope_theta, h);
  } else if (t > 0) {
    pass.rope = PackedRope(lengths, c.head_dim, c.rope_theta, h, starts);
  }
  recompute = recompute && caches == nullptr;
  for (size_t layer = 0; layer < layers_.size(); ++layer) {
    MoeStats stats;
    MoeStats* sink = layers_[layer].moe && moe_stats != nullptr ? &stats : nullptr;
    if (recompute) {
      // The stats come from the first run; the backward's rerun reports nowhere.
      auto first = std::make_shared<MoeStats*>(sink);
      h = Recomputed(
          [this, layer, pass, first](const at::Tensor& x) {
            MoeStats* out = *first;
            *first = nullptr;
            return Layer(layer, x, pass, out);
          },
          h, LayerParams(layers_[layer]));
    } else {
      h = Layer(layer, h, pass, sink);
    }
    if (sink != nullptr) moe_stats->push_back(std::move(stats));
  }
  return RmsNorm(h, final_norm_, c.rms_norm_eps);
}

std::vector<at::Tensor> DecoderModel::LayerParams(const DecoderLayer& l) {
  std::vector<at::Tensor> out = {l.input_norm, l.post_norm, l.q_norm, l.k_norm, l.router};
  for (const LoraLinear* p : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down}) {
    out.insert(out.end(), {p->weight, p->lora_a, p->lora_b});
  }
  const ExpertBank& e = l.experts;
  out.insert(out.end(), {e.gate, e.up, e.down, e.gate_a, e.gate_b, e.up_a, e.up_b, e.down_a, e.down_b});
  return out;
}

at::Tensor DecoderModel::Layer(size_t layer, const at::Tensor& x, const LayerPass& pass, MoeStats* stats) const {
  const ModelConfig& c = config_;
  const DecoderLayer& l = layers_[layer];
  const int64_t t = x.size(0);
  const double eps = c.rms_norm_eps;
  const double softmax_scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  const bool gqa = heads_ != kv_heads_;
  const int64_t q_width = heads_ * c.head_dim;
  const RegionFn& enter = pass.enter;
  at::Tensor a = RmsNorm(x, l.input_norm, eps);
  at::Tensor q, k, v;
  if (l.qkv_weight.defined()) {
    auto qkv = GroupedForward(a, l.qkv_weight, {&l.q, &l.k, &l.v}, enter);
    q = qkv[0], k = qkv[1], v = qkv[2];
  } else {
    at::Tensor in = enter ? enter(a) : a;
    q = l.q.Forward(in), k = l.k.Forward(in), v = l.v.Forward(in);
  }
  q = q.reshape({t, heads_, c.head_dim});
  k = k.reshape({t, kv_heads_, c.head_dim});
  v = v.reshape({t, kv_heads_, c.head_dim});
  if (c.qk_norm) {
    q = RmsNorm(q, l.q_norm, eps);
    k = RmsNorm(k, l.k_norm, eps);
  }
  at::Tensor o;
  if (pass.cp != nullptr) {
    q = t > 0 ? ApplyRope(q.transpose(0, 1), pass.rope) : q.transpose(0, 1);
    k = t > 0 ? ApplyRope(k.transpose(0, 1), pass.rope) : k.transpose(0, 1);
    o = parallel::ContextParallelAttention(q, k, v.transpose(0, 1), *pass.cp, softmax_scale, gqa, shard_.cp);
    o = o.transpose(0, 1).reshape({t, q_width});
  } else if (t > 0) {
    q = ApplyRope(q.transpose(0, 1), pass.rope);
    k = ApplyRope(k.transpose(0, 1), pass.rope);
    o = pass.caches != nullptr
            ? CachedAttention(q, k, v.transpose(0, 1), pass.lengths, softmax_scale, gqa, layer, *pass.caches)
            : PackedAttention(q, k, v.transpose(0, 1), pass.lengths, softmax_scale, gqa);
    o = o.transpose(0, 1).reshape({t, q_width});
  } else {
    // No tokens (a rank without data this round): keep the graph shape.
    o = (q.sum() + k.sum() + v.sum()).expand({0, q_width});
  }
  at::Tensor h = x + RowParallelForward(o, l.o, pass.reduce);
  at::Tensor m = RmsNorm(h, l.post_norm, eps);
  if (l.moe) return h + Moe(l, m, stats);
  at::Tensor g, u;
  if (l.gate_up_weight.defined()) {
    auto gu = GroupedForward(m, l.gate_up_weight, {&l.gate, &l.up}, enter);
    g = gu[0], u = gu[1];
  } else {
    at::Tensor in = enter ? enter(m) : m;
    g = l.gate.Forward(in), u = l.up.Forward(in);
  }
  return h + RowParallelForward(at::silu(g) * u, l.down, pass.reduce);
}

at::Tensor DecoderModel::Moe(const DecoderLayer& l, const at::Tensor& m, MoeStats* stats) const {
  const ModelConfig& c = config_;
  const parallel::Group& tp = shard_.tp;
  MoeStats ignored;
  MoeStats& s = stats != nullptr ? *stats : ignored;
  if (tp.active() || shard_.ep.active()) {
    // Each tp rank routes its part of the (replicated) tokens.
    at::Tensor part = parallel::ScatterRows(m, tp);
    at::Tensor out = parallel::ExpertParallelMoe(part, l.router, l.experts, c.num_experts_per_tok,
                                                 c.norm_topk_prob, shard_.ep, MoeStatsGroup(), &s);
    return parallel::GatherRows(out, m.size(0), tp);
  }
  return MoeForward(m, l.router, l.experts, c.num_experts_per_tok, c.norm_topk_prob, &s);
}

at::Tensor DecoderModel::Logits(const at::Tensor& hidden) const {
  // Computed as W hᵀ, then transposed: for a vocabulary-sized W, MKL's sgemm
  // runs this orientation about 25% faster than h Wᵀ, more than the copy costs.
  const LoraLinear& head = lm_head_;
  const parallel::Group& tp = shard_.tp;
  // Under bfloat16 the logits are a bf16 product (with an fp32 adapter added
  // as AddAdapter does), widened to fp32 for the logprobs, as transformers'
  // loss upcasts them.
  if (InBatchInvariantScope()) {
    at::Tensor logits = Linear(parallel::CopyToGroup(hidden, tp), head.weight);
    if (head.lora_a.defined()) {
      at::Tensor xa = parallel::CopyToGroup(Linear(AdapterInput(hidden, head.lora_a), head.lora_a), tp);
      logits = AddAdapter(logits, xa.mul(head.scale), head.lora_b);
    }
    return logits.to(at::kFloat);
  }
  at::Tensor ht = parallel::CopyToGroup(hidden, tp).t();
  at::Tensor logits_t = at::mm(head.weight, ht);
  if (head.lora_a.defined()) {
    at::Tensor xa = parallel::CopyToGroup(at::mm(AdapterInput(hidden, head.lora_a), head.lora_a.t()), tp);
    const at::ScalarType base = logits_t.scalar_type();
    if (base == head.lora_b.scalar_type()) {
      logits_t = at::addmm(logits_t, head.lora_b, xa.t().mul(head.scale));
    } else {
      // bf16 logits: the adapter is added in place to their fp32 copy (one
      // [V, T] fp32 buffer), which is then rounded back as peft does.
      logits_t = logits_t.to(head.lora_b.scalar_type()).addmm_(head.lora_b, xa.t().mul(head.scale)).to(base);
    }
  }
  // One copy into contiguous fp32 rows (no bf16 [T, V] copy on the way;
  // `to` would hand an fp32 product back as its transposed view).
  at::Tensor rows = at::empty({logits_t.size(1), logits_t.size(0)}, logits_t.options().dtype(at::kFloat));
  return rows.copy_(logits_t.t());
}

at::Tensor DecoderModel::Logprobs(const at::Tensor& logits, const at::Tensor& targets) const {
  if (!shard_.tp.active()) return TargetLogprobs(logits, targets);
  const parallel::Group& tp = shard_.tp;
  const int64_t begin = vocab_begin_;
  return TargetLogprobs(logits, targets, [&](const at::Tensor& l, const at::Tensor& index) {
    return parallel::VocabParallelLogprobs(l, index, begin, tp);
  });
}

at::Tensor DecoderModel::HiddenLogprobs(const at::Tensor& hidden, const at::Tensor& targets, int64_t chunk) const {
  const int64_t t = hidden.size(0);
  if (t <= chunk) return Logprobs(Logits(hidden), targets);
  const std::vector<at::Tensor> head = {lm_head_.weight, lm_head_.lora_a, lm_head_.lora_b};
  std::vector<at::Tensor> parts;
  for (int64_t begin = 0; begin < t; begin += chunk) {
    const int64_t n = std::min(chunk, t - begin);
    at::Tensor rows = targets.narrow(0, begin, n);
    parts.push_back(Recomputed([this, rows](const at::Tensor& h) { return Logprobs(Logits(h), rows); },
                               hidden.narrow(0, begin, n), head));
  }
  return at::cat(parts, 0);
}

absl::Status DecoderModel::SetTrainable(const std::map<std::string, at::Tensor>& values) {
  std::map<std::string, at::Tensor> slots;
  for (const TrainableParam& p : trainable_) {
    ForEachNamed(p, p.tensor, [&](const std::string& name, const at::Tensor& t) { slots[name] = t; });
  }
  for (const auto& [name, value] : values) {
    auto it = slots.find(name);
    if (it == slots.end()) return absl::InvalidArgumentError(absl::StrCat("unknown parameter '", name, "'"));
    if (it->second.sizes() != value.sizes()) {
      return absl::InvalidArgumentError(absl::StrCat("parameter '", name, "' has the wrong shape"));
    }
  }
  at::NoGradGuard no_grad;
  for (const auto& [name, value] : values) slots[name].copy_(value);
  RefreshComputeCopies(trainable_);
  return absl::OkStatus();
}

}  // namespace lathe::runtime
