// Loading and the forward pass of DecoderModel.
#include "runtime/decoder_model.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "params/model_table.h"
#include "parallel/context_parallel.h"
#include "runtime/archs/registry.h"
#include "runtime/param_loader.h"
#include "runtime/losses.h"
#include "runtime/recompute.h"
#include "core/status.h"
#include "runtime/weight_source.h"

namespace lathe::runtime {

absl::StatusOr<std::unique_ptr<DecoderModel>> DecoderModel::Load(const std::string& dir,
                                                                 const LoraSettings& lora,
                                                                 const ModelShard& shard, Dtype dtype) {
  LATHE_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  LATHE_ASSIGN_OR_RETURN(WeightSource source,
                         WeightSource::Open(dir, dtype == Dtype::kBFloat16 ? at::kBFloat16 : at::kFloat));
  return FromSource(config, source, lora, shard, dtype);
}

absl::StatusOr<std::unique_ptr<DecoderModel>> DecoderModel::FromSource(const ModelConfig& config,
                                                                       const TensorSource& source,
                                                                       const LoraSettings& lora,
                                                                       const ModelShard& shard, Dtype dtype) {
  std::unique_ptr<DecoderModel> model(new DecoderModel());
  model->config_ = config;
  model->lora_ = lora;
  model->shard_ = shard;
  model->dtype_ = dtype;
  LATHE_RETURN_IF_ERROR(model->Build(source));
  model->MoveToDevice();
  for (auto& block : model->blocks_) {
    std::vector<at::Tensor>& params = model->block_params_.emplace_back();
    block->Visit([&params](at::Tensor& t) { params.push_back(t); });
  }
  return model;
}

absl::Status DecoderModel::Build(const TensorSource& w) {
  const ModelConfig& c = config_;
  LATHE_ASSIGN_OR_RETURN(const Architecture* arch, FindArchitecture(c));
  const int64_t h = c.hidden_size;
  const int tp = shard_.tp.size(), tr = shard_.tp.rank();
  vocab_begin_ = parallel::PartBegin(c.vocab_size, tp, tr);
  const TpCut vocab = TpCut::Rows(vocab_begin_, parallel::PartBegin(c.vocab_size, tp, tr + 1) - vocab_begin_);
  const std::string& prefix = c.checkpoint.weight_prefix;
  ParamLoader loader(w, lora_, &trainable_);
  DescribedLoader embedding(loader, params::DescribeEmbedding(c), shard_);
  LATHE_ASSIGN_OR_RETURN(embed_, embedding.Tensor("embed_tokens"));
  LATHE_ASSIGN_OR_RETURN(blocks_, arch->load_layers(c, loader, prefix, shard_));
  final_norm_.eps = c.rms_norm_eps;
  final_norm_.offset = c.norm_style == NormStyle::kOnePlusWeight;
  DescribedLoader head(loader, params::DescribeHead(c), shard_);
  LATHE_ASSIGN_OR_RETURN(final_norm_.weight, head.Tensor("norm"));
  if (c.tie_word_embeddings) {
    lm_head_.weight = embed_;
    loader.AttachLora(lm_head_, "lm_head", c.vocab_size, h, vocab, LoraGroup::kUnembed);
  } else {
    LATHE_ASSIGN_OR_RETURN(lm_head_, head.Linear("lm_head"));
  }
  return absl::OkStatus();
}

namespace {

// RoPE rows of packed sequences whose positions start at `starts` (0 without).
RopeTables PackedRope(const std::vector<int64_t>& lengths, int64_t head_dim, const RopeSettings& settings,
                      const at::Tensor& like, const std::vector<int64_t>& starts = {}) {
  int64_t longest = 0;
  for (size_t i = 0; i < lengths.size(); ++i) longest = std::max(longest, (starts.empty() ? 0 : starts[i]) + lengths[i]);
  RopeTables rope = MakeRope(longest, head_dim, settings, like);
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
RopeTables GlobalRope(const std::vector<int64_t>& positions, int64_t head_dim, const RopeSettings& settings,
                      const at::Tensor& like) {
  const int64_t longest = *std::max_element(positions.begin(), positions.end()) + 1;
  RopeTables rope = MakeRope(longest, head_dim, settings, like);
  at::Tensor index = at::tensor(positions, at::TensorOptions().dtype(at::kLong)).to(like.device());
  return {rope.cos.index_select(0, index), rope.sin.index_select(0, index)};
}

}  // namespace

at::Tensor DecoderModel::Hidden(const at::Tensor& tokens, const std::vector<int64_t>& lengths,
                                std::vector<MoeStats>* moe_stats, std::vector<SequenceState>* states,
                                bool recompute, const parallel::SequenceSplit* split) const {
  const ModelConfig& c = config_;
  const int64_t t = tokens.size(0);
  const parallel::Group& tp = shard_.tp;
  LayerContext ctx;
  ctx.lengths = lengths;
  ctx.states = states;
  ctx.shard = &shard_;
  ctx.selections = std::make_shared<std::map<size_t, std::vector<KeySelection>>>();
  if (tp.active()) {
    ctx.enter = [&tp](const at::Tensor& x) { return parallel::CopyToGroup(x, tp); };
    ctx.reduce = [&tp](const at::Tensor& x) { return parallel::ReduceFromGroup(x, tp); };
  }
  at::Tensor h;
  if (tp.active()) {
    // Vocabulary-parallel lookup: rows outside this rank's part are zero.
    at::Tensor local = tokens - vocab_begin_;
    at::Tensor mine = local.ge(0).logical_and(local.lt(embed_.size(0)));
    at::Tensor rows = embed_.index_select(0, local.masked_fill(mine.logical_not(), 0));
    h = ctx.reduce(rows * mine.unsqueeze(1).to(rows.scalar_type()));
  } else {
    h = embed_.index_select(0, tokens);
  }
  std::vector<int64_t> starts;
  if (states != nullptr) {
    for (const SequenceState& s : *states) starts.push_back(s.length);
  }
  if (split != nullptr && states == nullptr) {
    ctx.cp = std::make_shared<const parallel::SequenceSplit>(*split);
    if (t > 0) ctx.rope = GlobalRope(split->positions, c.rotary.rotary_dim, c.rope, h);
  } else if (t > 0) {
    ctx.rope = PackedRope(lengths, c.rotary.rotary_dim, c.rope, h, starts);
  }
  recompute = recompute && states == nullptr;
  for (size_t layer = 0; layer < blocks_.size(); ++layer) {
    const Block& block = *blocks_[layer];
    MoeStats stats;
    MoeStats* sink = block.routed() && moe_stats != nullptr ? &stats : nullptr;
    if (recompute) {
      // The stats come from the first run; the backward's rerun reports nowhere.
      auto first = std::make_shared<MoeStats*>(sink);
      h = Recomputed(
          [&block, layer, ctx, first](const at::Tensor& x) {
            MoeStats* out = *first;
            *first = nullptr;
            return block.Forward(x, ctx, layer, out);
          },
          h, block_params_[layer]);
    } else {
      h = block.Forward(h, ctx, layer, sink);
    }
    if (sink != nullptr) moe_stats->push_back(std::move(stats));
  }
  if (states != nullptr) {
    for (size_t i = 0; i < states->size(); ++i) (*states)[i].length += lengths[i];
  }
  return final_norm_(h);
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

DecoderModel::HeadLoss DecoderModel::HiddenLoss(const at::Tensor& hidden, const at::Tensor& targets, int64_t chunk,
                                                const RowsLossFn& loss) const {
  std::vector<at::Tensor> logprobs, elementwise;
  at::Tensor total = ChunkedBackwardNow(
      [&](const at::Tensor& h, int64_t begin) {
        const int64_t n = h.size(0);
        at::Tensor lp = Logprobs(Logits(h), targets.narrow(0, begin, n));
        at::Tensor el = loss(lp, begin, n);
        logprobs.push_back(lp.detach());
        elementwise.push_back(el.detach());
        return el.sum();
      },
      hidden, chunk, {lm_head_.weight, lm_head_.lora_a, lm_head_.lora_b});
  return {at::cat(logprobs), at::cat(elementwise), total};
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
