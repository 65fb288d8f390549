// Content-Encoding: zstd request bodies: whatever decompresses stays within
// the limit, and anything refused is refused with the documented codes.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz/fuzz_util.h"
#include "http/zstd_body.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  constexpr int64_t kLimit = int64_t{1} << 20;
  const absl::string_view body(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<std::string> out = lathe::http::DecompressZstd(body, kLimit);
  if (out.ok()) {
    LATHE_FUZZ_CHECK(static_cast<int64_t>(out->size()) <= kLimit);
  } else {
    LATHE_FUZZ_CHECK(out.status().code() == absl::StatusCode::kInvalidArgument ||
               out.status().code() == absl::StatusCode::kResourceExhausted);
  }
  return 0;
}
