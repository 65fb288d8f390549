// The settings of one sampling request, their defaults and their rules, in
// one place for the coordinator (refusing at submit) and the runtime.
// Torch-free.
#ifndef LATHE_CORE_SAMPLING_SETTINGS_H_
#define LATHE_CORE_SAMPLING_SETTINGS_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "lathe/v1/service.pb.h"

namespace lathe::runtime {

struct SamplingSettings {
  int64_t max_tokens = 16;
  double temperature = 1.0;  // 0: greedy
  int64_t top_k = -1;        // -1: off
  double top_p = 1.0;        // (0, 1]
  uint64_t seed = 0;
  std::vector<std::vector<int32_t>> stop;  // token sequences that end a sample
};

// InvalidArgument for max_tokens < 1, a negative or non-finite temperature,
// top_k 0 or < -1, top_p outside (0, 1], or an empty stop sequence.
absl::Status ValidateSamplingSettings(const SamplingSettings& settings);

// Unset fields take the defaults above; then ValidateSamplingSettings.
absl::StatusOr<SamplingSettings> SamplingSettingsFromProto(const lathe::v1::SamplingParams& params);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_SAMPLING_SETTINGS_H_
