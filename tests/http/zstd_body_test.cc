// zstd request bodies: round trips (one frame, several, without a declared
// size), the output bound, and input that is not whole zstd frames.
#include "http/zstd_body.h"

#include <gtest/gtest.h>
#include <zstd.h>

#include <string>

namespace lathe::http {
namespace {

std::string Compress(const std::string& text) {
  std::string out(ZSTD_compressBound(text.size()), '\0');
  out.resize(ZSTD_compress(out.data(), out.size(), text.data(), text.size(), 3));
  return out;
}

// A frame that does not declare its size (what a streaming compressor writes).
std::string CompressStreamed(const std::string& text) {
  ZSTD_CCtx* ctx = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(ctx, ZSTD_c_contentSizeFlag, 0);
  std::string out(ZSTD_compressBound(text.size()) + 64, '\0');
  ZSTD_outBuffer o{out.data(), out.size(), 0};
  ZSTD_inBuffer in{text.data(), text.size(), 0};
  ZSTD_compressStream2(ctx, &o, &in, ZSTD_e_end);
  ZSTD_freeCCtx(ctx);
  out.resize(o.pos);
  return out;
}

TEST(ZstdBodyTest, RoundTrips) {
  const std::string text(300000, 'x');
  EXPECT_EQ(*DecompressZstd(Compress(text), 1 << 20), text);
  EXPECT_EQ(*DecompressZstd(CompressStreamed(text), 1 << 20), text);
  EXPECT_EQ(*DecompressZstd(Compress("ab") + Compress("cd"), 100), "abcd");
  EXPECT_EQ(*DecompressZstd(Compress(""), 100), "");
}

TEST(ZstdBodyTest, StopsAtTheBound) {
  const std::string text(1 << 20, ' ');
  EXPECT_EQ(DecompressZstd(Compress(text), (1 << 20) - 1).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(DecompressZstd(CompressStreamed(text), 1000).status().code(), absl::StatusCode::kResourceExhausted);
  absl::StatusOr<std::string> whole = DecompressZstd(Compress(text), 1 << 20);
  EXPECT_TRUE(whole.ok()) << whole.status();
}

TEST(ZstdBodyTest, RefusesWhatIsNotWholeFrames) {
  const std::string frame = Compress(std::string(5000, 'y') + "tail");
  for (const std::string& bad : {std::string(), std::string("not zstd"), frame.substr(0, frame.size() - 3),
                                 frame + "junk"}) {
    EXPECT_EQ(DecompressZstd(bad, 1 << 20).status().code(), absl::StatusCode::kInvalidArgument) << bad.size();
  }
}

}  // namespace
}  // namespace lathe::http
