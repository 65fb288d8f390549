// Defaults and checks of the LoRA configuration.
#include "core/lora_settings.h"

#include <cmath>

#include "core/status.h"
#include "core/validation.h"

namespace lathe::runtime {

absl::StatusOr<LoraSettings> LoraSettingsFromProto(const lathe::v1::LoraConfig& config) {
  LoraSettings s;
  if (config.rank() < 0) return absl::InvalidArgumentError("lora_config.rank must not be negative");
  s.rank = config.rank();
  if (config.has_alpha()) s.alpha = config.alpha();
  // The adapter's scale alpha / rank is a float32.
  if (!std::isfinite(s.alpha) || s.alpha <= 0) {
    return absl::InvalidArgumentError("lora_config.alpha must be a positive finite number");
  }
  LATHE_RETURN_IF_ERROR(CheckFloat32(s.alpha, "lora_config.alpha", /*normal=*/true));
  if (config.has_seed()) s.seed = static_cast<uint64_t>(config.seed());
  if (config.has_train_attn()) s.train_attn = config.train_attn();
  if (config.has_train_mlp()) s.train_mlp = config.train_mlp();
  if (config.has_train_unembed()) s.train_unembed = config.train_unembed();
  if (s.rank > 0 && !s.train_attn && !s.train_mlp && !s.train_unembed) {
    return absl::InvalidArgumentError(
        "lora_config: at least one of train_attn, train_mlp, train_unembed must be true");
  }
  return s;
}

}  // namespace lathe::runtime
