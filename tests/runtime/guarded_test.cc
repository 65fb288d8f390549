// The op boundary's exception policy: whatever is thrown inside becomes a
// Status naming the operation; nothing escapes.
#include "core/guarded.h"

#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <new>
#include <stdexcept>

#include "absl/status/statusor.h"

namespace lathe::runtime {
namespace {

TEST(GuardedTest, EveryKindOfExceptionBecomesAStatus) {
  absl::Status s = Guarded("optim_step", []() -> absl::Status { throw std::runtime_error("value out of range"); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(s.message(), "optim_step: value out of range");
  s = Guarded("forward", []() -> absl::Status { throw std::bad_alloc(); });
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(), "forward: out of memory");
  s = Guarded("sample", []() -> absl::Status { TORCH_CHECK(false, "shape mismatch"); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_NE(s.message().find("sample: shape mismatch"), std::string::npos) << s;
  s = Guarded("init", []() -> absl::Status { throw 42; });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(s.message(), "init: an unknown exception");
}

TEST(GuardedTest, ResultsAndErrorsPassThrough) {
  absl::StatusOr<int> v = Guarded("noop", []() -> absl::StatusOr<int> { return 7; });
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 7);
  v = Guarded("noop", []() -> absl::StatusOr<int> { return absl::NotFoundError("no run"); });
  EXPECT_EQ(v.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace lathe::runtime
