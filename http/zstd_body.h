// Request bodies sent with Content-Encoding: zstd (the Tinker SDK's
// forward_backward when client/config turns proto_compress_fwdbwd on),
// decompressed with Debian's libzstd.
#ifndef LATHE_HTTP_ZSTD_BODY_H_
#define LATHE_HTTP_ZSTD_BODY_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lathe::http {

// The bytes of the zstd frames in `compressed`, at most `max_bytes` of them
// (streamed, so a frame claiming a huge size allocates nothing up front).
// ResourceExhausted past `max_bytes`; InvalidArgument for data that is not
// complete zstd frames.
absl::StatusOr<std::string> DecompressZstd(absl::string_view compressed, int64_t max_bytes);

}  // namespace lathe::http

#endif  // LATHE_HTTP_ZSTD_BODY_H_
