// Sampling defaults and rules.
#include "core/sampling_settings.h"

#include <cmath>

#include "core/status.h"
#include "core/validation.h"

namespace lathe::runtime {

absl::Status ValidateSamplingSettings(const SamplingSettings& s) {
  if (s.max_tokens < 1) return absl::InvalidArgumentError("max_tokens must be >= 1");
  if (!(s.temperature >= 0) || !std::isfinite(s.temperature)) {
    return absl::InvalidArgumentError("temperature must be a finite number >= 0");
  }
  // Logits are divided by it in float32: a denormal one overflows them.
  LATHE_RETURN_IF_ERROR(CheckFloat32(s.temperature, "temperature", /*normal=*/true));
  if (s.top_k == 0 || s.top_k < -1) return absl::InvalidArgumentError("top_k must be -1 (off) or >= 1");
  if (!(s.top_p > 0 && s.top_p <= 1)) return absl::InvalidArgumentError("top_p must be in (0, 1]");
  for (const auto& stop : s.stop) {
    if (stop.empty()) return absl::InvalidArgumentError("a stop sequence is empty");
  }
  return absl::OkStatus();
}

absl::StatusOr<SamplingSettings> SamplingSettingsFromProto(const lathe::v1::SamplingParams& p) {
  SamplingSettings s;
  if (p.has_max_tokens()) s.max_tokens = p.max_tokens();
  if (p.has_temperature()) s.temperature = p.temperature();
  if (p.has_top_k()) s.top_k = p.top_k();
  if (p.has_top_p()) s.top_p = p.top_p();
  if (p.has_seed()) s.seed = p.seed();
  for (const lathe::v1::ModelInput& stop : p.stop_tokens()) {
    LATHE_ASSIGN_OR_RETURN(s.stop.emplace_back(), InputTokens(stop));
  }
  LATHE_RETURN_IF_ERROR(ValidateSamplingSettings(s));
  return s;
}

}  // namespace lathe::runtime
