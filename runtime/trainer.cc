// Trainer: validation, per-datum forward (and backward), loss outputs and
// metrics, and the optimizer step.
#include "runtime/trainer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <malloc.h>

#include <cstring>
#include <limits>
#include <map>

#include "absl/strings/str_cat.h"
#include "runtime/adamw.h"
#include "runtime/decoder_model.h"
#include "runtime/losses.h"
#include "runtime/status.h"
#include "runtime/tensor_data.h"
#include "runtime/validation.h"

namespace lathe::runtime {

struct Trainer::Impl {
  TrainerOptions options;
  std::unique_ptr<DecoderModel> model;
  AdamW adam;
};

Trainer::Trainer() : impl_(std::make_unique<Impl>()) {}
Trainer::~Trainer() = default;
DecoderModel& Trainer::model() { return *impl_->model; }
AdamW& Trainer::optimizer() { return impl_->adam; }

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const TrainerOptions& options) {
  std::unique_ptr<Trainer> trainer(new Trainer());
  trainer->impl_->options = options;
  if (options.retain_freed_memory) {
    // Large blocks would otherwise be mmap'ed and zeroed by the kernel on
    // every allocation: 10% of a step on a 150k vocabulary.
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
  }
  try {
    LATHE_ASSIGN_OR_RETURN(trainer->impl_->model, DecoderModel::Load(options.model_dir, options.lora));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("loading ", options.model_dir, ": ", e.what_without_backtrace()));
  }
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
  for (const TrainableParam& p : impl_->model->trainable()) info.trainable_parameters += p.tensor.numel();
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

int64_t Trainer::MicroBatchTokens() const {
  if (impl_->options.micro_batch_tokens > 0) return impl_->options.micro_batch_tokens;
  // Keep the fp32 logits of a micro-batch near 256 MiB.
  int64_t by_vocab = (int64_t{1} << 26) / impl_->model->config().vocab_size;
  return std::clamp<int64_t>(by_vocab, 512, 16384);
}

absl::StatusOr<lathe::v1::ForwardBackwardOutput> Trainer::Run(
    const lathe::v1::ForwardBackwardInput& input, bool backward) {
  const ModelConfig& config = impl_->model->config();
  LATHE_RETURN_IF_ERROR(ValidateBatch(input, {config.vocab_size, impl_->options.max_seq_len}));
  const LossSpec& spec = *FindLoss(input.loss_fn());
  std::map<std::string, double> loss_config = spec.config_defaults;
  for (const auto& [key, value] : input.loss_fn_config()) loss_config[key] = value;

  std::vector<std::vector<int32_t>> ids;
  std::vector<int64_t> lengths;
  for (const lathe::v1::Datum& datum : input.data()) {
    ids.push_back(*DatumTokens(datum));
    lengths.push_back(static_cast<int64_t>(ids.back().size()));
  }
  lathe::v1::ForwardBackwardOutput out;
  out.set_loss_fn_output_type("TensorData");
  double loss_sum = 0, tokens = 0, loss_tokens = 0, moe_frac = 0, moe_max = 0;
  int64_t moe_layers = 0;
  try {
    at::AutoGradMode grad_mode(backward);
    for (auto [begin, end] : MicroBatches(lengths, MicroBatchTokens())) {
      std::vector<int32_t> packed;
      for (int i = begin; i < end; ++i) packed.insert(packed.end(), ids[i].begin(), ids[i].end());
      std::vector<int64_t> part(lengths.begin() + begin, lengths.begin() + end);
      std::vector<MoeStats> moe;
      at::Tensor hidden = impl_->model->Hidden(at::tensor(packed, at::kLong), part, &moe);
      at::Tensor logits = impl_->model->Logits(hidden);
      std::vector<std::map<std::string, at::Tensor>> inputs(end - begin);
      std::vector<at::Tensor> targets;
      bool flat = true;
      for (int i = begin; i < end; ++i) {
        for (const auto& [key, t] : input.data(i).loss_fn_inputs()) inputs[i - begin][key] = TensorFromWire(t);
        targets.push_back(inputs[i - begin].at("target_tokens"));
        flat = flat && targets.back().dim() == 1;
      }
      // One logprob op over the packed rows when every target is 1-D, so the
      // backward builds a single [T, V] gradient.
      at::Tensor packed_lp = flat ? TargetLogprobs(logits, at::cat(targets)) : at::Tensor();
      at::Tensor total;
      int64_t offset = 0;
      for (int i = begin; i < end; ++i) {
        const auto& in = inputs[i - begin];
        at::Tensor lp = flat ? packed_lp.narrow(0, offset, lengths[i])
                             : TargetLogprobs(logits.narrow(0, offset, lengths[i]), in.at("target_tokens"));
        at::Tensor elementwise = ElementwiseLoss(spec.name, lp, in, loss_config);
        at::Tensor loss = elementwise.sum();
        total = total.defined() ? total + loss : loss;
        loss_tokens += in.at("target_tokens").ne(kIgnoreTarget).sum().item<double>();
        auto* record = out.add_loss_fn_outputs()->mutable_tensors();
        (*record)["logprobs"] = TensorToWire(lp.detach());
        (*record)["elementwise_loss"] = TensorToWire(elementwise.detach());
        offset += lengths[i];
      }
      if (backward) total.backward();
      loss_sum += total.item<double>();
      tokens += static_cast<double>(packed.size());
      AddMoeMetrics(moe, config.num_experts, moe_frac, moe_max, moe_layers);
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(input.loss_fn(), ": ", e.what_without_backtrace()));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(input.loss_fn(), ": out of memory"));
  }
  auto& metrics = *out.mutable_metrics();
  metrics["loss:sum"] = loss_sum;
  metrics["num_tokens:sum"] = tokens;
  metrics["num_loss_tokens:sum"] = loss_tokens;
  if (moe_layers > 0) {
    metrics["moe_frac_experts_with_tokens:mean"] = moe_frac / static_cast<double>(moe_layers);
    metrics["moe_max_over_mean_load:max"] = moe_max;
  }
  return out;
}

absl::StatusOr<lathe::v1::OptimStepOutput> Trainer::OptimStep(const lathe::v1::AdamParams& params) {
  LATHE_ASSIGN_OR_RETURN(AdamHyper hyper, AdamHyperFromProto(params));
  AdamStepResult result;
  try {
    result = impl_->adam.Step(impl_->model->trainable(), hyper);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("optim_step: ", e.what_without_backtrace()));
  }
  lathe::v1::OptimStepOutput out;
  auto& metrics = *out.mutable_metrics();
  metrics["grad_norm:mean"] = result.grad_norm;
  metrics["learning_rate:mean"] = hyper.learning_rate;
  metrics["step:max"] = static_cast<double>(result.step);
  return out;
}

}  // namespace lathe::runtime
