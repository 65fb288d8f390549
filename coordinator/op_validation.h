// Synchronous checks of a submitted operation, before anything is queued.
#ifndef LATHE_COORDINATOR_OP_VALIDATION_H_
#define LATHE_COORDINATOR_OP_VALIDATION_H_

#include "absl/status/status.h"
#include "lathe/v1/replica.pb.h"

namespace lathe::coordinator {

// OK, or: InvalidArgument (no run_id, seq_id < 1, no operation, a malformed
// batch, bad Adam or LoRA parameters) naming the field; Unimplemented for an
// operation this deployment does not serve yet.
absl::Status ValidateOp(const lathe::v1::SubmitRequest& op, const lathe::v1::ModelSummary& model);

// OK, or InvalidArgument for a LoRA config runtime::LoraSettingsFromProto
// refuses or a rank above the model's max_lora_rank.
absl::Status ValidateLora(const lathe::v1::LoraConfig& lora, const lathe::v1::ModelSummary& model);

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_OP_VALIDATION_H_
