// Client-named identifiers: checkpoint paths (lathe://<run>/<kind>/<name>),
// run and op ids, page tokens and checkpoint file names. Whatever passes must
// round-trip and can never name a place outside its folder.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "coordinator/request_limits.h"
#include "fuzz/fuzz_util.h"
#include "core/checkpoint_path.h"

namespace {

using lathe::coordinator::kMaxOpIdBytes;
using lathe::coordinator::kMaxRelativeFileNameBytes;

// Every '/'-separated part non-empty, not "." nor "..".
bool PlainComponents(absl::string_view path) {
  for (absl::string_view part : absl::StrSplit(path, '/')) {
    if (part.empty() || part == "." || part == "..") return false;
  }
  return true;
}

void CheckPath(const std::string& text, bool allow_sampler) {
  absl::StatusOr<lathe::runtime::CheckpointRef> ref = lathe::runtime::ParseCheckpointPath(text, allow_sampler);
  if (!ref.ok()) return;
  LATHE_FUZZ_CHECK(lathe::runtime::CheckpointUri(*ref) == text);
  LATHE_FUZZ_CHECK(lathe::runtime::ValidateRunName(ref->run_id).ok());
  LATHE_FUZZ_CHECK(lathe::runtime::ValidateCheckpointName(ref->name).ok());
  LATHE_FUZZ_CHECK(ref->kind == "weights" || (allow_sampler && ref->kind == "sampler_weights"));
  LATHE_FUZZ_CHECK(lathe::coordinator::ValidateRunId(ref->run_id).ok());
  const std::string dir = lathe::runtime::CheckpointDir("/root", *ref);
  LATHE_FUZZ_CHECK(dir.rfind("/root/", 0) == 0 && PlainComponents(absl::string_view(dir).substr(1)));
}

void CheckIdentifiers(const std::string& text) {
  if (lathe::coordinator::ValidateRunId(text).ok()) {
    LATHE_FUZZ_CHECK(!text.empty() && text.size() <= 128 && PlainComponents(text));
  }
  if (lathe::coordinator::ValidateOpId(text).ok()) LATHE_FUZZ_CHECK(!text.empty() && text.size() <= kMaxOpIdBytes);
  if (lathe::runtime::ValidateCheckpointName(text).ok()) {
    LATHE_FUZZ_CHECK(text.find('/') == std::string::npos && PlainComponents(text) && text[0] != '.');
  }
  if (lathe::coordinator::ValidateRelativeFileName(text).ok()) {
    LATHE_FUZZ_CHECK(text.size() <= kMaxRelativeFileNameBytes && PlainComponents(text));
    for (unsigned char c : text) LATHE_FUZZ_CHECK(c >= 0x20 && c != 0x7f);
  }
  (void)lathe::coordinator::ValidateBaseModel(text);
  for (int64_t total : {int64_t{0}, int64_t{7}, int64_t{1} << 40}) {
    absl::StatusOr<int64_t> index = lathe::coordinator::ParsePageToken(text, total);
    if (index.ok()) LATHE_FUZZ_CHECK(*index >= 0 && *index <= total);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  CheckPath(text, false);
  CheckPath(text, true);
  CheckIdentifiers(text);
  return 0;
}
