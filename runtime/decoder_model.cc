// Loading, LoRA attachment and the forward pass of DecoderModel.
#include "runtime/decoder_model.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "runtime/status.h"
#include "runtime/weight_source.h"

namespace lathe::runtime {

void ForEachNamed(const TrainableParam& p, const at::Tensor& value,
                  const std::function<void(const std::string&, const at::Tensor&)>& fn) {
  if (!p.per_expert) {
    fn(p.name, value);
    return;
  }
  for (int64_t e = 0; e < value.size(0); ++e) {
    fn(absl::StrReplaceAll(p.name, {{"{e}", absl::StrCat(e)}}), value.select(0, e));
  }
}

absl::StatusOr<std::unique_ptr<DecoderModel>> DecoderModel::Load(const std::string& dir,
                                                                 const LoraSettings& lora) {
  std::unique_ptr<DecoderModel> model(new DecoderModel());
  LATHE_ASSIGN_OR_RETURN(model->config_, LoadModelConfig(dir));
  model->lora_ = lora;
  LATHE_ASSIGN_OR_RETURN(WeightSource source, WeightSource::Open(dir));
  LATHE_RETURN_IF_ERROR(model->Build(source));
  return model;
}

absl::Status DecoderModel::Build(const WeightSource& w) {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size;
  LATHE_ASSIGN_OR_RETURN(embed_, w.Take("model.embed_tokens.weight", {c.vocab_size, h}));
  LATHE_ASSIGN_OR_RETURN(final_norm_, w.Take("model.norm.weight", {h}));
  if (c.tie_word_embeddings) {
    lm_head_.weight = embed_;
  } else {
    LATHE_ASSIGN_OR_RETURN(lm_head_.weight, w.Take("lm_head.weight", {c.vocab_size, h}));
  }
  layers_.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    DecoderLayer& l = layers_[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LATHE_ASSIGN_OR_RETURN(l.input_norm, w.Take(p + "input_layernorm.weight", {h}));
    LATHE_ASSIGN_OR_RETURN(l.post_norm, w.Take(p + "post_attention_layernorm.weight", {h}));
    LATHE_ASSIGN_OR_RETURN(l.q.weight, w.Take(p + "self_attn.q_proj.weight", {c.q_dim(), h}));
    LATHE_ASSIGN_OR_RETURN(l.k.weight, w.Take(p + "self_attn.k_proj.weight", {c.kv_dim(), h}));
    LATHE_ASSIGN_OR_RETURN(l.v.weight, w.Take(p + "self_attn.v_proj.weight", {c.kv_dim(), h}));
    LATHE_ASSIGN_OR_RETURN(l.o.weight, w.Take(p + "self_attn.o_proj.weight", {h, c.q_dim()}));
    if (c.qk_norm) {
      LATHE_ASSIGN_OR_RETURN(l.q_norm, w.Take(p + "self_attn.q_norm.weight", {c.head_dim}));
      LATHE_ASSIGN_OR_RETURN(l.k_norm, w.Take(p + "self_attn.k_norm.weight", {c.head_dim}));
    }
    l.moe = c.IsMoeLayer(i);
    if (l.moe) {
      const int64_t inter = c.moe_intermediate_size;
      LATHE_ASSIGN_OR_RETURN(l.router, w.Take(p + "mlp.gate.weight", {c.num_experts, h}));
      LATHE_ASSIGN_OR_RETURN(auto experts, w.TakeExperts(p + "mlp", c.num_experts, inter, h));
      l.experts.gate = experts.gate;
      l.experts.up = experts.up;
      l.experts.down = experts.down;
    } else {
      const int64_t inter = c.intermediate_size;
      LATHE_ASSIGN_OR_RETURN(l.gate.weight, w.Take(p + "mlp.gate_proj.weight", {inter, h}));
      LATHE_ASSIGN_OR_RETURN(l.up.weight, w.Take(p + "mlp.up_proj.weight", {inter, h}));
      LATHE_ASSIGN_OR_RETURN(l.down.weight, w.Take(p + "mlp.down_proj.weight", {h, inter}));
    }
  }
  if (lora_.full_finetune()) {
    RegisterFull();
    return absl::OkStatus();
  }
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(lora_.seed);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    DecoderLayer& l = layers_[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    AttachLora(l.q, p + "self_attn.q_proj", lora_.train_attn, gen);
    AttachLora(l.k, p + "self_attn.k_proj", lora_.train_attn, gen);
    AttachLora(l.v, p + "self_attn.v_proj", lora_.train_attn, gen);
    AttachLora(l.o, p + "self_attn.o_proj", lora_.train_attn, gen);
    if (l.moe && lora_.train_mlp) {
      AttachExpertLora(l.experts, p + "mlp.experts.{e}", gen);
    } else if (!l.moe) {
      AttachLora(l.gate, p + "mlp.gate_proj", lora_.train_mlp, gen);
      AttachLora(l.up, p + "mlp.up_proj", lora_.train_mlp, gen);
      AttachLora(l.down, p + "mlp.down_proj", lora_.train_mlp, gen);
    }
  }
  AttachLora(lm_head_, "lm_head", lora_.train_unembed, gen);
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
at::Tensor LoraA(std::vector<int64_t> shape, at::Generator& gen) {
  double bound = 1.0 / std::sqrt(static_cast<double>(shape.back()));
  return at::empty(shape, at::kFloat).uniform_(-bound, bound, gen).requires_grad_(true);
}

at::Tensor LoraB(std::vector<int64_t> shape) {
  return at::zeros(shape, at::kFloat).requires_grad_(true);
}

}  // namespace

void DecoderModel::AttachLora(LoraLinear& layer, const std::string& prefix, bool enabled,
                              at::Generator& gen) {
  if (!enabled) return;
  const int64_t r = lora_.rank;
  layer.lora_a = LoraA({r, layer.weight.size(1)}, gen);
  layer.lora_b = LoraB({layer.weight.size(0), r});
  layer.scale = lora_.scale();
  trainable_.push_back({prefix + ".lora_A.weight", layer.lora_a, false});
  trainable_.push_back({prefix + ".lora_B.weight", layer.lora_b, false});
}

void DecoderModel::AttachExpertLora(ExpertBank& bank, const std::string& prefix, at::Generator& gen) {
  const int64_t r = lora_.rank;
  const int64_t e = bank.gate.size(0), inter = bank.gate.size(1), h = bank.gate.size(2);
  bank.scale = lora_.scale();
  auto add = [&](at::Tensor& a, at::Tensor& b, const char* proj, int64_t in, int64_t out) {
    a = LoraA({e, r, in}, gen);
    b = LoraB({e, out, r});
    trainable_.push_back({absl::StrCat(prefix, ".", proj, ".lora_A.weight"), a, true});
    trainable_.push_back({absl::StrCat(prefix, ".", proj, ".lora_B.weight"), b, true});
  };
  add(bank.gate_a, bank.gate_b, "gate_proj", h, inter);
  add(bank.up_a, bank.up_b, "up_proj", h, inter);
  add(bank.down_a, bank.down_b, "down_proj", inter, h);
}

void DecoderModel::RegisterFull() {
  auto add = [&](const std::string& name, at::Tensor& t, bool per_expert = false) {
    t.requires_grad_(true);
    trainable_.push_back({name, t, per_expert});
  };
  add("model.embed_tokens.weight", embed_);
  for (size_t i = 0; i < layers_.size(); ++i) {
    DecoderLayer& l = layers_[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    add(p + "input_layernorm.weight", l.input_norm);
    add(p + "self_attn.q_proj.weight", l.q.weight);
    add(p + "self_attn.k_proj.weight", l.k.weight);
    add(p + "self_attn.v_proj.weight", l.v.weight);
    add(p + "self_attn.o_proj.weight", l.o.weight);
    if (l.q_norm.defined()) {
      add(p + "self_attn.q_norm.weight", l.q_norm);
      add(p + "self_attn.k_norm.weight", l.k_norm);
    }
    add(p + "post_attention_layernorm.weight", l.post_norm);
    if (l.moe) {
      add(p + "mlp.gate.weight", l.router);
      add(p + "mlp.experts.{e}.gate_proj.weight", l.experts.gate, true);
      add(p + "mlp.experts.{e}.up_proj.weight", l.experts.up, true);
      add(p + "mlp.experts.{e}.down_proj.weight", l.experts.down, true);
    } else {
      add(p + "mlp.gate_proj.weight", l.gate.weight);
      add(p + "mlp.up_proj.weight", l.up.weight);
      add(p + "mlp.down_proj.weight", l.down.weight);
    }
  }
  add("model.norm.weight", final_norm_);
  if (!config_.tie_word_embeddings) add("lm_head.weight", lm_head_.weight);
}

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

RopeTables PackedRope(const std::vector<int64_t>& lengths, int64_t head_dim, double theta,
                      const at::Tensor& like) {
  int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  RopeTables rope = MakeRope(longest, head_dim, theta, like);
  if (lengths.size() == 1) return rope;
  std::vector<at::Tensor> positions;
  for (int64_t n : lengths) positions.push_back(at::arange(n, at::TensorOptions().dtype(at::kLong).device(like.device())));
  at::Tensor index = at::cat(positions);
  return {rope.cos.index_select(0, index), rope.sin.index_select(0, index)};
}

}  // namespace

at::Tensor DecoderModel::Hidden(const at::Tensor& tokens, const std::vector<int64_t>& lengths,
                                std::vector<MoeStats>* moe_stats) const {
  const ModelConfig& c = config_;
  const int64_t t = tokens.size(0);
  const double eps = c.rms_norm_eps;
  at::Tensor h = embed_.index_select(0, tokens);
  RopeTables rope = PackedRope(lengths, c.head_dim, c.rope_theta, h);
  const double softmax_scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  const bool gqa = c.num_attention_heads != c.num_key_value_heads;
  for (const DecoderLayer& l : layers_) {
    at::Tensor a = RmsNorm(h, l.input_norm, eps);
    at::Tensor q, k, v;
    if (l.qkv_weight.defined()) {
      auto qkv = GroupedForward(a, l.qkv_weight, {&l.q, &l.k, &l.v});
      q = qkv[0], k = qkv[1], v = qkv[2];
    } else {
      q = l.q.Forward(a), k = l.k.Forward(a), v = l.v.Forward(a);
    }
    q = q.reshape({t, c.num_attention_heads, c.head_dim});
    k = k.reshape({t, c.num_key_value_heads, c.head_dim});
    v = v.reshape({t, c.num_key_value_heads, c.head_dim});
    if (c.qk_norm) {
      q = RmsNorm(q, l.q_norm, eps);
      k = RmsNorm(k, l.k_norm, eps);
    }
    q = ApplyRope(q.transpose(0, 1), rope);
    k = ApplyRope(k.transpose(0, 1), rope);
    at::Tensor o = PackedAttention(q, k, v.transpose(0, 1), lengths, softmax_scale, gqa);
    o = o.transpose(0, 1).reshape({t, c.q_dim()});
    h = h + l.o.Forward(o);
    at::Tensor m = RmsNorm(h, l.post_norm, eps);
    if (l.moe) {
      MoeStats stats;
      h = h + MoeForward(m, l.router, l.experts, c.num_experts_per_tok, c.norm_topk_prob, &stats);
      if (moe_stats != nullptr) moe_stats->push_back(std::move(stats));
    } else {
      at::Tensor g, u;
      if (l.gate_up_weight.defined()) {
        auto gu = GroupedForward(m, l.gate_up_weight, {&l.gate, &l.up});
        g = gu[0], u = gu[1];
      } else {
        g = l.gate.Forward(m), u = l.up.Forward(m);
      }
      h = h + l.down.Forward(at::silu(g) * u);
    }
  }
  return RmsNorm(h, final_norm_, eps);
}

at::Tensor DecoderModel::Logits(const at::Tensor& hidden) const {
  // Computed as W hᵀ, then transposed: for a vocabulary-sized W, MKL's sgemm
  // runs this orientation about 25% faster than h Wᵀ, more than the copy costs.
  const LoraLinear& head = lm_head_;
  at::Tensor ht = hidden.t();
  at::Tensor logits_t = at::mm(head.weight, ht);
  if (head.lora_a.defined()) {
    logits_t = at::addmm(logits_t, head.lora_b, at::mm(head.lora_a, ht).mul(head.scale));
  }
  return logits_t.t().contiguous().to(at::kFloat);
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
  return absl::OkStatus();
}

}  // namespace lathe::runtime
