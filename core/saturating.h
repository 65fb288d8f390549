// Integer arithmetic on times that clamps instead of overflowing: ttl and
// expiry values come from clients and may be anywhere in int64_t.
#ifndef LATHE_CORE_SATURATING_H_
#define LATHE_CORE_SATURATING_H_

#include <cstdint>
#include <limits>

namespace lathe::runtime {

// a + b, clamped to [INT64_MIN, INT64_MAX].
inline int64_t SaturatingAdd(int64_t a, int64_t b) {
  int64_t sum = 0;
  if (!__builtin_add_overflow(a, b, &sum)) return sum;
  return b > 0 ? std::numeric_limits<int64_t>::max() : std::numeric_limits<int64_t>::min();
}

// a * b, clamped to [INT64_MIN, INT64_MAX].
inline int64_t SaturatingMul(int64_t a, int64_t b) {
  int64_t product = 0;
  if (!__builtin_mul_overflow(a, b, &product)) return product;
  return (a < 0) != (b < 0) ? std::numeric_limits<int64_t>::min() : std::numeric_limits<int64_t>::max();
}

// When something made at `created_unix_ms` with a lifetime of `ttl_seconds`
// expires, in Unix milliseconds: 0 (never) for ttl_seconds <= 0, else
// created + ttl * 1000 clamped to INT64_MAX (a ttl too large to represent
// means "as late as can be written", never a time in the past).
inline int64_t ExpiryUnixMillis(int64_t created_unix_ms, int64_t ttl_seconds) {
  if (ttl_seconds <= 0) return 0;
  return SaturatingAdd(created_unix_ms, SaturatingMul(ttl_seconds, 1000));
}

}  // namespace lathe::runtime

#endif  // LATHE_CORE_SATURATING_H_
