// Operation checks shared with the runtime (batch, Adam, LoRA rules).
#include "coordinator/op_validation.h"

#include "absl/strings/str_cat.h"
#include "runtime/adam_hyper.h"
#include "runtime/checkpoint_path.h"
#include "runtime/lora_settings.h"
#include "runtime/validation.h"

namespace lathe::coordinator {

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
      return runtime::LoraSettingsFromProto(op.init().lora()).status();
    case Op::kForward:
      return runtime::ValidateBatch(op.forward(), limits);
    case Op::kForwardBackward:
      return runtime::ValidateBatch(op.forward_backward(), limits);
    case Op::kOptimStep:
      return runtime::AdamHyperFromProto(op.optim_step()).status();
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
    case Op::kComputeLogprobs:
      return absl::UnimplementedError(
          absl::StrCat(Op::descriptor()->FindFieldByNumber(op.op_case())->name(), " is not implemented yet"));
  }
  return absl::InvalidArgumentError("unknown operation");
}

}  // namespace lathe::coordinator
