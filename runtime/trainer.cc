// Trainer: validation, per-datum forward (and backward), loss outputs and
// metrics, and the optimizer step.
#include "runtime/trainer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <malloc.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>

#include "absl/strings/str_cat.h"
#include "parallel/context_parallel.h"
#include "parallel/data_parallel.h"
#include "parallel/grad_sync.h"
#include "parallel/model_parallel.h"
#include "runtime/adamw.h"
#include "runtime/decoder_model.h"
#include "runtime/device.h"
#include "core/guarded.h"
#include "runtime/losses.h"
#include "core/status.h"
#include "runtime/tensor_data.h"
#include "core/validation.h"

namespace lathe::runtime {

namespace {

// Large blocks would otherwise be mmap'ed and zeroed by the kernel on every
// allocation: 10% of a step on a 150k vocabulary. Where chunks of logits
// alternate with smaller buffers, heap-held large blocks fragment instead:
// those calls map blocks of 32 MiB and more (32 MiB / cp under context
// parallelism, whose per-rank buffers are cp times smaller: kept in the heap
// they fragment it the same way, 1.6x the live memory at 16k tokens, cp 4).
void KeepLargeBlocksInHeap(bool keep, int cp = 1) {
  constexpr int kGlibcDefaultMmapMax = 65536;
  mallopt(M_MMAP_MAX, keep ? 0 : kGlibcDefaultMmapMax);
  if (!keep) mallopt(M_MMAP_THRESHOLD, (32 << 20) / std::max(cp, 1));
}

}  // namespace

struct Trainer::Impl {
  TrainerOptions options;
  std::unique_ptr<DecoderModel> model;
  AdamW adam;
};

Trainer::Trainer() : impl_(std::make_unique<Impl>()) {}
Trainer::~Trainer() = default;
DecoderModel& Trainer::model() { return *impl_->model; }
const DecoderModel& Trainer::model() const { return *impl_->model; }
AdamW& Trainer::optimizer() { return impl_->adam; }

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const TrainerOptions& options) {
  std::unique_ptr<Trainer> trainer(new Trainer());
  trainer->impl_->options = options;
  if (options.retain_freed_memory) {
    mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
    KeepLargeBlocksInHeap(true);
  }
  LATHE_RETURN_IF_ERROR(Guarded(absl::StrCat("loading ", options.model_dir), [&]() -> absl::Status {
    ModelShard shard;
    if (options.parallel != nullptr) {
      shard.tp = {options.parallel->tp.get(), options.parallel->timeout};
      shard.ep = {options.parallel->ep.get(), options.parallel->timeout};
      shard.cp = {options.parallel->cp.get(), options.parallel->timeout};
    }
    LATHE_ASSIGN_OR_RETURN(shard.device, TorchDevice(options.device));
    LATHE_ASSIGN_OR_RETURN(trainer->impl_->model,
                           DecoderModel::Load(options.model_dir, options.lora, shard, options.dtype));
    return absl::OkStatus();
  }));
  if (trainer->impl_->options.max_seq_len <= 0) {
    trainer->impl_->options.max_seq_len = trainer->impl_->model->config().max_position_embeddings;
  }
  return trainer;
}

TrainerInfo Trainer::GetInfo() const {
  TrainerInfo info;
  info.model_dir = impl_->options.model_dir;
  info.architecture = impl_->model->config().architecture;
  info.lora = impl_->options.lora;
  info.max_seq_len = impl_->options.max_seq_len;
  info.step = impl_->adam.step();
  info.dtype = impl_->options.dtype;
  // Whole-model counts: a shard stands for full_size / its extent copies of itself.
  for (const TrainableParam& p : impl_->model->trainable()) {
    int64_t n = p.tensor.numel();
    if (p.shard_dim >= 0 && p.tensor.size(p.shard_dim) > 0) n = n / p.tensor.size(p.shard_dim) * p.full_size;
    info.trainable_parameters += n;
  }
  return info;
}

absl::StatusOr<lathe::v1::ForwardBackwardOutput> Trainer::Forward(
    const lathe::v1::ForwardBackwardInput& input) {
  return Run(input, /*backward=*/false);
}

absl::StatusOr<lathe::v1::ForwardBackwardOutput> Trainer::ForwardBackward(
    const lathe::v1::ForwardBackwardInput& input) {
  return Run(input, /*backward=*/true);
}

namespace {

// Adds the routing metrics of one datum's MoE layers to the running sums.
void AddMoeMetrics(const std::vector<MoeStats>& stats, int64_t num_experts, double& frac_sum,
                   double& max_over_mean, int64_t& count) {
  for (const MoeStats& s : stats) {
    if (s.total_routed == 0) continue;
    frac_sum += static_cast<double>(s.experts_with_tokens) / static_cast<double>(num_experts);
    double mean = static_cast<double>(s.total_routed) / static_cast<double>(num_experts);
    max_over_mean = std::max(max_over_mean, static_cast<double>(s.max_load) / mean);
    ++count;
  }
}

}  // namespace

namespace {

// Consecutive datums packed up to `budget` tokens; a longer datum is alone.
std::vector<std::pair<int, int>> MicroBatches(const std::vector<int64_t>& lengths, int64_t budget) {
  std::vector<std::pair<int, int>> ranges;  // [begin, end)
  int begin = 0;
  int64_t tokens = 0;
  for (int i = 0; i < static_cast<int>(lengths.size()); ++i) {
    if (i > begin && tokens + lengths[i] > budget) {
      ranges.emplace_back(begin, i);
      begin = i;
      tokens = 0;
    }
    tokens += lengths[i];
  }
  ranges.emplace_back(begin, static_cast<int>(lengths.size()));
  return ranges;
}

}  // namespace

namespace {

// Tokens whose fp32 logits take about 256 MiB.
int64_t LogitsBudgetTokens(int64_t vocab_size) {
  return std::clamp<int64_t>((int64_t{1} << 26) / vocab_size, 512, 16384);
}

}  // namespace

absl::StatusOr<Recompute> ParseRecompute(const std::string& name) {
  if (name == "auto") return Recompute::kAuto;
  if (name == "on") return Recompute::kOn;
  if (name == "off") return Recompute::kOff;
  return absl::InvalidArgumentError(absl::StrCat("recompute must be auto, on or off, not '", name, "'"));
}

int64_t Trainer::MicroBatchTokens() const {
  if (impl_->options.micro_batch_tokens > 0) return impl_->options.micro_batch_tokens;
  return LogitsBudgetTokens(impl_->model->config().vocab_size);
}

int64_t Trainer::LogprobChunkTokens() const {
  if (impl_->options.logprob_chunk_tokens > 0) return impl_->options.logprob_chunk_tokens;
  return LogitsBudgetTokens(impl_->model->config().vocab_size);
}

namespace {

// The same verdict on every member of `g`: OK when every member's is, else
// the first failure (one small collective when all succeed).
absl::Status Agree(const absl::Status& mine, const parallel::Group& g) {
  if (!g.active()) return mine;
  if (parallel::AllAgree(mine.ok(), g)) return absl::OkStatus();
  return parallel::AgreeStatus(mine, *g.comm, g.timeout);
}

// Moves the accumulated gradients out of the parameters (undefined stays so).
std::vector<at::Tensor> TakeGradients(std::vector<TrainableParam>& params) {
  std::vector<at::Tensor> out;
  for (TrainableParam& p : params) {
    out.push_back(p.tensor.grad());
    p.tensor.mutable_grad() = at::Tensor();
  }
  return out;
}

// Adds `earlier` back under the gradients just computed, or, when the call
// failed, puts them back alone.
void ReturnGradients(std::vector<TrainableParam>& params, std::vector<at::Tensor> earlier, bool keep_new) {
  at::NoGradGuard no_grad;
  FoldComputeGradients(params);  // what a failed backward left on bf16 copies
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor fresh = params[i].tensor.grad();
    if (keep_new && fresh.defined() && earlier[i].defined()) earlier[i].add_(fresh);
    params[i].tensor.mutable_grad() = keep_new && !earlier[i].defined() ? fresh : earlier[i];
  }
}

}  // namespace

namespace {

// Whether the datums' loss inputs can be packed into one row per token: the
// same keys in every datum, each 1-D with a row per target.
bool SameInputs(const std::vector<std::map<std::string, at::Tensor>>& inputs) {
  for (const auto& in : inputs) {
    if (in.size() != inputs.front().size()) return false;
    const int64_t n = in.at("target_tokens").size(0);
    for (const auto& [key, t] : in) {
      if (!inputs.front().count(key) || t.dim() != 1 || t.size(0) != n) return false;
    }
  }
  return !inputs.empty();
}

// The rows of one round this rank runs: all of them, or under context
// parallelism its split of each sequence (parallel/context_parallel.h).
class RowsOfRound {
 public:
  RowsOfRound(const std::vector<int64_t>& lengths, const parallel::Group& cp) : cp_(cp) {
    if (!cp.active()) return;
    split_ = parallel::SplitSequences(lengths, cp.size(), cp.rank());
    own_ = at::tensor(split_.own(), at::kLong);
  }
  const parallel::SequenceSplit* split() const { return cp_.active() ? &split_ : nullptr; }
  // This rank's rows of x, whose row 0 is global row `begin`.
  at::Tensor Select(const at::Tensor& x, int64_t begin = 0) const {
    if (!cp_.active()) return x;
    const int64_t b = split_.LocalBegin(begin), e = split_.LocalBegin(begin + x.size(0));
    return x.index_select(0, own_.narrow(0, b, e - b).to(x.device()) - begin);
  }
  // This rank's rows of local rows `x` that lie in global rows [begin, begin + n).
  at::Tensor Rows(const at::Tensor& x, int64_t begin, int64_t n) const {
    if (!cp_.active()) return x.narrow(0, begin, n);
    const int64_t b = split_.LocalBegin(begin);
    return x.narrow(0, b, split_.LocalBegin(begin + n) - b);
  }
  // Every member's rows of global rows [begin, begin + n) in order; x holds this
  // rank's (differentiable; the backward takes this rank's rows back).
  at::Tensor Gather(const at::Tensor& x, int64_t begin, int64_t n) const {
    if (!cp_.active()) return x;
    const bool whole = begin == 0 && n == split_.total;
    return parallel::GatherSequenceRows(x, whole ? split_ : split_.Restrict(begin, n), cp_, /*sum_grads=*/false);
  }

 private:
  parallel::Group cp_;
  parallel::SequenceSplit split_;
  at::Tensor own_;
};

}  // namespace

absl::StatusOr<lathe::v1::ForwardBackwardOutput> Trainer::Run(
    const lathe::v1::ForwardBackwardInput& input, bool backward) {
  const ModelConfig& config = impl_->model->config();
  parallel::ParallelContext* ctx = impl_->options.parallel;
  const bool replica_part = ctx != nullptr && impl_->options.replica_batches;
  LATHE_RETURN_IF_ERROR(ValidateBatch(input, {config.vocab_size, impl_->options.max_seq_len, replica_part}));
  const LossSpec& spec = *FindLoss(input.loss_fn());
  std::map<std::string, double> loss_config = spec.config_defaults;
  for (const auto& [key, value] : input.loss_fn_config()) loss_config[key] = value;

  std::vector<std::vector<int32_t>> ids;
  std::vector<int64_t> lengths;
  for (const lathe::v1::Datum& datum : input.data()) {
    ids.push_back(*DatumTokens(datum));
    lengths.push_back(static_cast<int64_t>(ids.back().size()));
  }
  // The datums this rank runs: all of them, or its data shard's share (of
  // the whole batch, or of its replica's part).
  std::vector<int> mine;
  const int shards = ctx == nullptr ? 1 : replica_part ? ctx->data_groups() : ctx->num_data_shards();
  const int my_shard = ctx == nullptr ? 0 : replica_part ? ctx->place.dp_rank : ctx->data_shard();
  const std::vector<int> shard_of = parallel::SplitByTokens(lengths, shards);
  for (int i = 0; i < static_cast<int>(lengths.size()); ++i) {
    if (shard_of[i] == my_shard) mine.push_back(i);
  }
  std::vector<int64_t> my_lengths;
  for (int i : mine) my_lengths.push_back(lengths[i]);
  std::vector<std::pair<int, int>> batches;
  if (!mine.empty()) batches = MicroBatches(my_lengths, MicroBatchTokens());
  lathe::v1::ForwardBackwardOutput out;
  out.set_loss_fn_output_type("TensorData");
  double loss_sum = 0, tokens = 0, loss_tokens = 0, moe_frac = 0, moe_max = 0;
  int64_t moe_layers = 0;
  const DecoderModel& model = *impl_->model;
  // The ranks that run rounds together (collectives inside the model span
  // data shards), and every rank that accumulates gradients for one step.
  const parallel::Group rounds_group =
      ctx == nullptr ? parallel::Group{} : parallel::Group{replica_part ? ctx->replica.get() : ctx->world.get(), ctx->timeout};
  const parallel::Group cp_group = ctx == nullptr ? parallel::Group{} : parallel::Group{ctx->cp.get(), ctx->timeout};
  const parallel::Group step_group = ctx == nullptr ? parallel::Group{} : parallel::Group{ctx->world.get(), ctx->timeout};
  // This call's gradients accumulate apart from earlier ones, so a failed
  // call leaves the run's gradients as they were (on every rank).
  std::vector<at::Tensor> earlier;
  if (backward) earlier = TakeGradients(impl_->model->trainable());
  absl::Status status = Guarded(input.loss_fn(), [&]() -> absl::Status {
    // Ranks of a sharded model run the same number of rounds; a rank out of
    // datums runs empty ones.
    int64_t rounds = static_cast<int64_t>(batches.size());
    int64_t longest = 0;
    for (auto [b, e] : batches) {
      int64_t n = 0;
      for (int j = b; j < e; ++j) n += my_lengths[j];
      longest = std::max(longest, n);
    }
    if (rounds_group.active()) {
      at::Tensor r = at::tensor({rounds, longest}, at::kLong);
      parallel::AllReduceMaxInPlace(r, rounds_group);
      rounds = r[0].item<int64_t>();
      longest = r[1].item<int64_t>();
    }
    if (impl_->options.retain_freed_memory) KeepLargeBlocksInHeap(longest <= LogprobChunkTokens(), cp_group.size());
    const Recompute mode = impl_->options.recompute;
    const bool recompute =
        backward && (mode == Recompute::kOn || (mode == Recompute::kAuto && longest > kRecomputeAutoTokens));
    at::AutoGradMode grad_mode(backward);
    for (int64_t round = 0; round < rounds; ++round) {
      auto [begin, end] = round < static_cast<int64_t>(batches.size()) ? batches[round] : std::pair<int, int>{0, 0};
      at::Tensor total;
      std::vector<MoeStats> moe;
      int64_t packed_tokens = 0;
      double round_loss = 0;
      // Everything up to the loss may fail on one rank alone (an exception, a
      // non-finite loss from its datums): the round's ranks agree before any
      // of them starts the backward, whose collectives all must join.
      absl::Status round_status = Guarded(input.loss_fn(), [&]() -> absl::Status {
        std::vector<int32_t> packed;
        std::vector<int64_t> part;
        for (int j = begin; j < end; ++j) {
          packed.insert(packed.end(), ids[mine[j]].begin(), ids[mine[j]].end());
          part.push_back(my_lengths[j]);
        }
        packed_tokens = static_cast<int64_t>(packed.size());
        // Under context parallelism this rank runs its rows of each sequence;
        // logprobs are gathered back whole, so losses and outputs are as without.
        const RowsOfRound rows(part, cp_group);
        at::Tensor hidden = model.Hidden(rows.Select(OnDevice(at::tensor(packed, at::kLong), model.device())), part,
                                         &moe, nullptr, recompute, rows.split());
        std::vector<std::map<std::string, at::Tensor>> inputs(end - begin);
        std::vector<at::Tensor> targets;
        bool flat = true;
        for (int j = begin; j < end; ++j) {
          for (const auto& [key, t] : input.data(mine[j]).loss_fn_inputs()) inputs[j - begin][key] = OnDevice(TensorFromWire(t), model.device());
          targets.push_back(inputs[j - begin].at("target_tokens"));
          flat = flat && targets.back().dim() == 1;
        }
        // One logprob op over the packed rows when every target is 1-D (one
        // [T, V] gradient buffer per chunk rather than one per datum).
        const int64_t chunk = LogprobChunkTokens();
        at::Tensor packed_lp, packed_loss;
        if (flat) {
          at::Tensor all = targets.empty() ? at::empty({0}, at::dtype(at::kLong).device(model.device()))
                                           : at::cat(targets);
          // A loss of each token on its own lets the head's backward run
          // chunk by chunk right after its forward (no second logits GEMM).
          std::map<std::string, at::Tensor> packed_in;
          if (backward && PerTokenLoss(spec.name) && SameInputs(inputs)) {
            for (const auto& [key, t] : inputs.front()) {
              std::vector<at::Tensor> parts;
              for (const auto& in : inputs) parts.push_back(in.at(key));
              packed_in[key] = rows.Select(at::cat(parts));
            }
          }
          if (!packed_in.empty()) {
            DecoderModel::HeadLoss head = model.HiddenLoss(
                hidden, packed_in.at("target_tokens"), chunk, [&](const at::Tensor& lp, int64_t b, int64_t n) {
                  std::map<std::string, at::Tensor> part;
                  for (const auto& [key, t] : packed_in) part[key] = t.narrow(0, b, n);
                  return ElementwiseLoss(spec.name, lp, part, loss_config);
                });
            packed_lp = rows.Gather(head.logprobs, 0, packed_tokens);
            packed_loss = rows.Gather(head.elementwise, 0, packed_tokens);
            total = head.loss;
          } else {
            packed_lp = rows.Gather(model.HiddenLogprobs(hidden, rows.Select(all), chunk), 0, packed_tokens);
          }
        }
        int64_t offset = 0;
        std::vector<at::Tensor> losses;
        at::Tensor summed;  // the datums' losses added in order (the reported loss)
        for (int j = begin; j < end; ++j) {
          const auto& in = inputs[j - begin];
          const int64_t n = my_lengths[j];
          at::Tensor lp = flat ? packed_lp.narrow(0, offset, n)
                               : rows.Gather(model.HiddenLogprobs(rows.Rows(hidden, offset, n),
                                                                  rows.Select(in.at("target_tokens"), offset), chunk),
                                             offset, n);
          at::Tensor elementwise =
              packed_loss.defined() ? packed_loss.narrow(0, offset, n) : ElementwiseLoss(spec.name, lp, in, loss_config);
          losses.push_back(elementwise.sum());
          summed = summed.defined() ? summed + losses.back() : losses.back();
          loss_tokens += in.at("target_tokens").ne(kIgnoreTarget).sum().item<double>();
          auto* record = out.add_loss_fn_outputs()->mutable_tensors();
          (*record)["logprobs"] = TensorToWire(lp.detach());
          (*record)["elementwise_loss"] = TensorToWire(elementwise.detach());
          offset += my_lengths[j];
        }
        if (!total.defined()) total = summed;
        if (!total.defined()) total = packed_lp.sum();  // an empty round
        round_loss = (summed.defined() ? summed : total).item<double>();
        if (!std::isfinite(round_loss)) {
          for (size_t k = 0; k < losses.size(); ++k) {
            const double v = losses[k].item<double>();
            if (!std::isfinite(v)) {
              return absl::InvalidArgumentError(absl::StrCat(
                  "datum ", mine[begin + static_cast<int>(k)], ": the loss is ", v,
                  " in float32; check its weights, advantages and logprobs"));
            }
          }
          return absl::InvalidArgumentError("the batch's loss is not finite in float32");
        }
        return absl::OkStatus();
      });
      LATHE_RETURN_IF_ERROR(Agree(round_status, rounds_group));
      if (backward) {
        total.backward();
        // Each micro-batch's bf16 gradients accumulate in fp32.
        FoldComputeGradients(impl_->model->trainable());
      }
      loss_sum += round_loss;
      tokens += static_cast<double>(packed_tokens);
      AddMoeMetrics(moe, config.num_experts, moe_frac, moe_max, moe_layers);
    }
    return absl::OkStatus();
  });
  if (backward) {
    // Every replica's part of one batch goes into the same step: if one part
    // failed, every replica drops what this call added.
    if (replica_part && !parallel::CommunicationBroken()) {
      status = Guarded(input.loss_fn(), [&] {
        if (parallel::AllAgree(status.ok(), step_group)) return absl::OkStatus();
        return status.ok() ? absl::AbortedError("another replica's part of this batch failed; nothing was accumulated")
                           : status;
      });
    }
    ReturnGradients(impl_->model->trainable(), std::move(earlier), status.ok());
  }
  LATHE_RETURN_IF_ERROR(status);
  auto& metrics = *out.mutable_metrics();
  metrics["loss:sum"] = loss_sum;
  metrics["num_tokens:sum"] = tokens;
  metrics["num_loss_tokens:sum"] = loss_tokens;
  if (moe_layers > 0) {
    metrics["moe_frac_experts_with_tokens:mean"] = moe_frac / static_cast<double>(moe_layers);
    metrics["moe_max_over_mean_load:max"] = moe_max;
  }
  if (ctx != nullptr) {
    return parallel::GatherOutputs(out, mine, input.data_size(), replica_part ? *ctx->replica_data : *ctx->shards,
                                   ctx->timeout);
  }
  return out;
}

absl::StatusOr<lathe::v1::OptimStepOutput> Trainer::OptimStep(const lathe::v1::AdamParams& params) {
  LATHE_ASSIGN_OR_RETURN(AdamHyper hyper, AdamHyperFromProto(params));
  AdamStepResult result;
  LATHE_RETURN_IF_ERROR(Guarded("optim_step", [&]() -> absl::Status {
    std::vector<TrainableParam>& params = impl_->model->trainable();
    const parallel::ParallelContext* ctx = impl_->options.parallel;
    AdamW::StepHooks hooks;
    if (ctx != nullptr) {
      parallel::SyncGradients(params, *ctx);
      hooks.global_norm = [&] { return parallel::GlobalGradNorm(params, *ctx); };
      hooks.all_agree = [&](bool mine) { return parallel::AllAgree(mine, {ctx->world.get(), ctx->timeout}); };
    }
    LATHE_ASSIGN_OR_RETURN(result, impl_->adam.Step(params, hyper, hooks));
    RefreshComputeCopies(params);
    return absl::OkStatus();
  }));
  lathe::v1::OptimStepOutput out;
  auto& metrics = *out.mutable_metrics();
  metrics["grad_norm:mean"] = result.grad_norm;
  metrics["learning_rate:mean"] = hyper.learning_rate;
  metrics["step:max"] = static_cast<double>(result.step);
  return out;
}

}  // namespace lathe::runtime
