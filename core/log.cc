// Process-wide logging state behind LATHE_LOG.
#include "core/log.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace lathe::runtime {
namespace {

std::atomic<int> g_rank{-1};
std::atomic<int> g_world_size{0};

LogLevel LevelFromEnv() {
  const char* v = std::getenv("LATHE_LOG_LEVEL");
  if (v == nullptr) return LogLevel::kInfo;
  if (std::strcmp(v, "debug") == 0) return LogLevel::kDebug;
  if (std::strcmp(v, "warning") == 0) return LogLevel::kWarning;
  if (std::strcmp(v, "error") == 0) return LogLevel::kError;
  return LogLevel::kInfo;
}

std::atomic<int> g_level{static_cast<int>(LevelFromEnv())};

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "D";
    case LogLevel::kInfo: return "I";
    case LogLevel::kWarning: return "W";
    case LogLevel::kError: return "E";
  }
  return "?";
}

}  // namespace

void SetLogRank(int rank, int world_size) {
  g_rank = rank;
  g_world_size = world_size;
}

void SetLogLevel(LogLevel level) { g_level = static_cast<int>(level); }

bool LogEnabled(LogLevel level) { return static_cast<int>(level) >= g_level.load(); }

void LogLine(LogLevel level, const char* file, int line, const std::string& message) {
  const char* base = std::strrchr(file, '/');
  base = base ? base + 1 : file;
  std::string prefix = absl::StrFormat("%s %s:%d]", LevelName(level), base, line);
  if (g_rank >= 0) prefix += absl::StrFormat(" [rank %d/%d]", g_rank.load(), g_world_size.load());
  std::fprintf(stderr, "%s %s\n", prefix.c_str(), message.c_str());
}

}  // namespace lathe::runtime
