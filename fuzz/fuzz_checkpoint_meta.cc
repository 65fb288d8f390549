// The coordinator's reader of checkpoint manifests (manifest.json) and
// sampler sidecars (lathe_sampler.json), files anyone with access to the
// checkpoint folder may have written. The first byte picks the kind.
#include <cstddef>
#include <cstdint>
#include <string>

#include "coordinator/checkpoint_meta.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string kind = (data[0] & 1) ? "sampler_weights" : "weights";
  const absl::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  absl::StatusOr<lathe::coordinator::CheckpointMeta> meta = lathe::coordinator::ParseCheckpointMeta(text, kind);
  if (!meta.ok()) {
    LATHE_FUZZ_CHECK(meta.status().code() == absl::StatusCode::kDataLoss);
    return 0;
  }
  LATHE_FUZZ_CHECK(meta->expires_unix_ms >= 0);
  LATHE_FUZZ_CHECK(!meta->created_unix_ms.has_value() || *meta->created_unix_ms >= 0);
  return 0;
}
