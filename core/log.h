// LATHE_LOG(level, fmt, ...): one line to stderr, prefixed with the level and
// "[rank r/w]" once the process knows its rank.
#ifndef LATHE_CORE_LOG_H_
#define LATHE_CORE_LOG_H_

#include <string>

#include "absl/strings/str_format.h"

namespace lathe::runtime {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Sets the "[rank r/w]" prefix; before a call, no rank is printed.
void SetLogRank(int rank, int world_size);
// Lines below `level` are dropped. Default kInfo; LATHE_LOG_LEVEL=debug|info|warning|error.
void SetLogLevel(LogLevel level);
bool LogEnabled(LogLevel level);
void LogLine(LogLevel level, const char* file, int line, const std::string& message);

}  // namespace lathe::runtime

#define LATHE_LOG(level, ...)                                                         \
  do {                                                                                \
    if (::lathe::runtime::LogEnabled(::lathe::runtime::LogLevel::k##level)) {         \
      ::lathe::runtime::LogLine(::lathe::runtime::LogLevel::k##level, __FILE__, __LINE__, \
                                ::absl::StrFormat(__VA_ARGS__));                      \
    }                                                                                 \
  } while (0)

#endif  // LATHE_CORE_LOG_H_
