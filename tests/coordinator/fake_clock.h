// A Clock the test moves by hand.
#ifndef LATHE_TESTS_COORDINATOR_FAKE_CLOCK_H_
#define LATHE_TESTS_COORDINATOR_FAKE_CLOCK_H_

#include "absl/synchronization/mutex.h"
#include "coordinator/op_ledger.h"

namespace lathe::coordinator {

class FakeClock : public Clock {
 public:
  absl::Time Now() const override {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void Advance(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_) = absl::FromUnixSeconds(1'700'000'000);
};

}  // namespace lathe::coordinator

#endif  // LATHE_TESTS_COORDINATOR_FAKE_CLOCK_H_
