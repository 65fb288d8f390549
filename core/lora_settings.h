// Which parameters a training run trains: a LoRA adapter (rank > 0) on the
// chosen module groups, or every weight of the model (rank == 0).
#ifndef LATHE_CORE_LORA_SETTINGS_H_
#define LATHE_CORE_LORA_SETTINGS_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "lathe/v1/types.pb.h"

namespace lathe::runtime {

struct LoraSettings {
  int64_t rank = 32;  // 0 = full fine-tuning
  double alpha = 32.0;
  uint64_t seed = 0;
  bool train_attn = true;   // q, k, v, o projections
  bool train_mlp = true;    // gate, up, down of dense MLPs and of every expert
  bool train_unembed = true;  // lm_head

  bool full_finetune() const { return rank == 0; }
  double scale() const { return rank > 0 ? alpha / static_cast<double>(rank) : 0.0; }
};

// Applies the documented defaults to unset fields. InvalidArgument for a
// negative rank, a non-finite or non-positive alpha, or a LoRA with every
// module group turned off.
absl::StatusOr<LoraSettings> LoraSettingsFromProto(const lathe::v1::LoraConfig& config);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_LORA_SETTINGS_H_
