// Operation checks shared with the runtime (batch, Adam, LoRA rules).
#include "coordinator/op_validation.h"


#include "absl/strings/str_cat.h"
#include "core/adam_hyper.h"
#include "core/checkpoint_path.h"
#include "core/lora_settings.h"
#include "core/sampling_settings.h"
#include "core/validation.h"

namespace lathe::coordinator {
namespace {

// The prompt's token count; InvalidArgument for an empty prompt, an id outside
// the vocabulary, or a prompt that leaves no room for `max_tokens`.
absl::StatusOr<int64_t> ValidatePrompt(const lathe::v1::ModelInput& prompt, const lathe::v1::ModelSummary& model,
                                       int64_t max_tokens) {
  absl::StatusOr<std::vector<int32_t>> tokens = runtime::InputTokens(prompt);
  if (!tokens.ok()) return tokens.status();
  if (tokens->empty()) return absl::InvalidArgumentError("the prompt is empty");
  for (size_t i = 0; i < tokens->size(); ++i) {
    if ((*tokens)[i] < 0 || (*tokens)[i] >= model.vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token ", i, " is ", (*tokens)[i], ", outside [0, ",
                                                     model.vocab_size(), ")"));
    }
  }
  const int64_t n = static_cast<int64_t>(tokens->size());
  if (n + max_tokens > model.max_seq_len()) {
    return absl::InvalidArgumentError(absl::StrCat("prompt of ", n, " tokens + max_tokens ", max_tokens,
                                                   " exceeds max_seq_len ", model.max_seq_len()));
  }
  return n;
}

// At most one of model_path, policy_version and base; a model_path must name
// sampler weights.
absl::Status ValidateWeights(const std::string& model_path, int64_t policy_version, bool base, bool current) {
  if ((!model_path.empty()) + (policy_version != 0) + base + current > 1) {
    return absl::InvalidArgumentError("give at most one of model_path, policy_version, base and current_weights");
  }
  if (policy_version < 0) return absl::InvalidArgumentError("policy_version must be >= 1 (0: not pinned)");
  if (model_path.empty()) return absl::OkStatus();
  absl::StatusOr<runtime::CheckpointRef> ref = runtime::ParseCheckpointPath(model_path, /*allow_sampler=*/true);
  if (!ref.ok()) return ref.status();
  if (ref->kind != "sampler_weights") {
    return absl::InvalidArgumentError("model_path must be lathe://<run_id>/sampler_weights/<name>");
  }
  return absl::OkStatus();
}

absl::Status ValidateSample(const lathe::v1::SampleOp& s, const lathe::v1::ModelSummary& model) {
  if (absl::Status st = ValidateWeights(s.model_path(), s.policy_version(), s.base(), s.current_weights());
      !st.ok()) {
    return st;
  }
  if (s.topk_prompt_logprobs() < 0 || s.topk_prompt_logprobs() > model.vocab_size()) {
    return absl::InvalidArgumentError("topk_prompt_logprobs must be in [0, vocab_size]");
  }
  if (s.num_samples() < 1 || s.num_samples() > 128) {
    return absl::InvalidArgumentError(absl::StrCat("num_samples must be in [1, 128] (got ", s.num_samples(), ")"));
  }
  absl::StatusOr<runtime::SamplingSettings> settings = runtime::SamplingSettingsFromProto(s.params());
  if (!settings.ok()) return settings.status();
  return ValidatePrompt(s.prompt(), model, settings->max_tokens).status();
}

}  // namespace

absl::Status ValidateLora(const lathe::v1::LoraConfig& lora, const lathe::v1::ModelSummary& model) {
  absl::StatusOr<runtime::LoraSettings> settings = runtime::LoraSettingsFromProto(lora);
  if (!settings.ok()) return settings.status();
  if (model.max_lora_rank() > 0 && settings->rank > model.max_lora_rank()) {
    return absl::InvalidArgumentError(absl::StrCat("lora_config.rank ", settings->rank, " exceeds ",
                                                   model.max_lora_rank(), ", the model's hidden size"));
  }
  return absl::OkStatus();
}

absl::Status ValidateOp(const lathe::v1::SubmitRequest& op, const lathe::v1::ModelSummary& model) {
  using Op = lathe::v1::SubmitRequest;
  if (op.run_id().empty()) return absl::InvalidArgumentError("run_id is required");
  if (op.seq_id() < 1) {
    return absl::InvalidArgumentError(absl::StrCat("seq_id must be >= 1 (got ", op.seq_id(), ")"));
  }
  const runtime::BatchLimits limits{model.vocab_size(), model.max_seq_len()};
  switch (op.op_case()) {
    case Op::OP_NOT_SET:
      return absl::InvalidArgumentError("no operation given");
    case Op::kInit:
      if (op.init().load_path().empty()) return ValidateLora(op.init().lora(), model);
      if (op.init().has_lora()) {
        return absl::InvalidArgumentError("init with load_path takes the checkpoint's LoRA config: leave lora unset");
      }
      return runtime::ParseCheckpointPath(op.init().load_path()).status();
    case Op::kForward:
      return runtime::ValidateBatch(op.forward(), limits);
    case Op::kForwardBackward:
      return runtime::ValidateBatch(op.forward_backward(), limits);
    case Op::kOptimStep:
      return runtime::AdamHyperFromProto(op.optim_step()).status();
    case Op::kDeleteRun:
    case Op::kNoop:
      return absl::OkStatus();
    case Op::kSaveState:
      if (op.save_state().ttl_seconds() < 0) return absl::InvalidArgumentError("save_state.ttl_seconds must be >= 0");
      return runtime::ValidateCheckpointName(op.save_state().name(), "save_state.name");
    case Op::kLoadState:
      return runtime::ParseCheckpointPath(op.load_state().path()).status();
    case Op::kLoadStateWithOptimizer:
      return runtime::ParseCheckpointPath(op.load_state_with_optimizer().path()).status();
    case Op::kSaveWeightsForSampler:
      if (op.save_weights_for_sampler().ttl_seconds() < 0) {
        return absl::InvalidArgumentError("save_weights_for_sampler.ttl_seconds must be >= 0");
      }
      return runtime::ValidateCheckpointName(op.save_weights_for_sampler().name(), "save_weights_for_sampler.name");
    case Op::kSample:
      return ValidateSample(op.sample(), model);
    case Op::kComputeLogprobs: {
      const lathe::v1::ComputeLogprobsOp& c = op.compute_logprobs();
      if (absl::Status st = ValidateWeights(c.model_path(), c.policy_version(), c.base(), c.current_weights());
          !st.ok()) {
        return st;
      }
      return ValidatePrompt(op.compute_logprobs().prompt(), model, 0).status();
    }
  }
  return absl::InvalidArgumentError("unknown operation");
}

}  // namespace lathe::coordinator
