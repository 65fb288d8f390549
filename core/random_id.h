// Identifiers the coordinator makes up (runs, sessions, sampling sessions):
// a prefix and 64 random bits, so two are alike only by chance.
#ifndef LATHE_CORE_RANDOM_ID_H_
#define LATHE_CORE_RANDOM_ID_H_

#include <string>

#include "absl/strings/string_view.h"

namespace lathe::runtime {

// "<prefix>-<16 lower-case hex digits>". Thread-safe.
std::string RandomId(absl::string_view prefix);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_RANDOM_ID_H_
