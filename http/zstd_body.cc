// Bounded streaming zstd decompression.
#include "http/zstd_body.h"

#include <zstd.h>

#include <memory>

#include "absl/strings/str_cat.h"

namespace lathe::http {

absl::StatusOr<std::string> DecompressZstd(absl::string_view compressed, int64_t max_bytes) {
  std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> ctx(ZSTD_createDCtx(), ZSTD_freeDCtx);
  if (ctx == nullptr) return absl::ResourceExhaustedError("cannot allocate a zstd decompressor");
  std::string out;
  std::string buffer(ZSTD_DStreamOutSize(), '\0');
  ZSTD_inBuffer in{compressed.data(), compressed.size(), 0};
  size_t pending = 0;  // nonzero while a frame is unfinished
  while (true) {
    ZSTD_outBuffer chunk{buffer.data(), buffer.size(), 0};
    pending = ZSTD_decompressStream(ctx.get(), &chunk, &in);
    if (ZSTD_isError(pending)) {
      return absl::InvalidArgumentError(
          absl::StrCat("the zstd body does not decompress: ", ZSTD_getErrorName(pending)));
    }
    if (static_cast<int64_t>(out.size() + chunk.pos) > max_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the zstd body decompresses to more than --max_request_bytes (", max_bytes, " bytes)"));
    }
    out.append(buffer.data(), chunk.pos);
    // Done once the input is consumed and the last frame ended (0), or the
    // decoder had no more to give (a frame cut short: refused below).
    if (in.pos == in.size && (pending == 0 || chunk.pos < chunk.size)) break;
  }
  if (compressed.empty() || pending != 0) {
    return absl::InvalidArgumentError("the zstd body ends inside a frame (or holds none)");
  }
  return out;
}

}  // namespace lathe::http
