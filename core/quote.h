// Quoting client input inside error messages, bounded: a message must never
// grow with the request that caused it (a 1 MiB identifier echoed back would
// make the status itself too large to deliver).
#ifndef LATHE_CORE_QUOTE_H_
#define LATHE_CORE_QUOTE_H_

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"

namespace lathe::runtime {

// Bytes of client input QuoteForMessage keeps by default.
inline constexpr size_t kQuotedBytes = 128;

// `text` in single quotes for a message: at most `max_bytes` of it, with
// non-printable bytes and quotes C-escaped; a longer input is cut and marked
// "...' (N bytes)". The result is at most 4 * max_bytes + 32 bytes long
// (kQuotedBytes holds any valid run id or checkpoint name whole).
std::string QuoteForMessage(absl::string_view text, size_t max_bytes = kQuotedBytes);

// `message` cut to at most `max_bytes` (marked "... (truncated)"), never
// splitting a UTF-8 sequence. A last guard for messages built elsewhere.
std::string TruncateMessage(absl::string_view message, size_t max_bytes);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_QUOTE_H_
