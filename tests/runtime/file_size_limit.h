// Fault injection for the tests of atomic writers: a cap on the size of any
// file this process writes, so a write fails midway (EFBIG) even as root.
#ifndef LATHE_TESTS_RUNTIME_FILE_SIZE_LIMIT_H_
#define LATHE_TESTS_RUNTIME_FILE_SIZE_LIMIT_H_

#include <sys/resource.h>

#include <csignal>

namespace lathe::runtime {

// While alive, writing past `bytes` into any file fails with EFBIG (SIGXFSZ
// is ignored). Not thread-safe: the limit and the signal are per process.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    ::getrlimit(RLIMIT_FSIZE, &saved_);
    old_handler_ = std::signal(SIGXFSZ, SIG_IGN);
    rlimit capped = saved_;
    capped.rlim_cur = bytes;
    ::setrlimit(RLIMIT_FSIZE, &capped);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &saved_);
    std::signal(SIGXFSZ, old_handler_);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;

 private:
  rlimit saved_{};
  void (*old_handler_)(int) = SIG_DFL;
};

}  // namespace lathe::runtime

#endif  // LATHE_TESTS_RUNTIME_FILE_SIZE_LIMIT_H_
