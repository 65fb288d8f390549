#include "core/random_id.h"

#include <cstdint>
#include <mutex>
#include <random>

#include "absl/strings/str_format.h"

namespace lathe::runtime {

std::string RandomId(absl::string_view prefix) {
  static std::mutex mu;
  static std::mt19937_64 rng(std::random_device{}());
  uint64_t bits;
  {
    std::lock_guard<std::mutex> lock(mu);
    bits = rng();
  }
  return absl::StrFormat("%s-%016x", prefix, bits);
}

}  // namespace lathe::runtime
