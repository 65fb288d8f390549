// Bounded quoting of client input in messages.
#include "core/quote.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace lathe::runtime {
namespace {

// The longest prefix of `text` of at most `max_bytes` that does not end
// inside a UTF-8 sequence.
absl::string_view Utf8Prefix(absl::string_view text, size_t max_bytes) {
  if (text.size() <= max_bytes) return text;
  size_t end = max_bytes;
  // Step back over continuation bytes (10xxxxxx) to the start of a sequence.
  while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
  return text.substr(0, end);
}

}  // namespace

std::string QuoteForMessage(absl::string_view text, size_t max_bytes) {
  const absl::string_view kept = Utf8Prefix(text, max_bytes);
  std::string out = absl::StrCat("'", absl::CHexEscape(kept));
  if (kept.size() == text.size()) return absl::StrCat(out, "'");
  return absl::StrCat(out, "...' (", text.size(), " bytes)");
}

std::string TruncateMessage(absl::string_view message, size_t max_bytes) {
  if (message.size() <= max_bytes) return std::string(message);
  constexpr absl::string_view kMark = "... (truncated)";
  const size_t keep = max_bytes > kMark.size() ? max_bytes - kMark.size() : 0;
  return absl::StrCat(Utf8Prefix(message, keep), kMark);
}

}  // namespace lathe::runtime
