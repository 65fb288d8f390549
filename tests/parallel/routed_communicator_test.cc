// MakeRoutedCommunicator: host buffers reach the host backend, device
// buffers the device backend; a mixed call or a missing device backend is
// refused with the reason, reaching neither.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace lathe::parallel {
namespace {

// A one-member group that records the calls it completes.
class Recording : public Communicator {
 public:
  explicit Recording(std::vector<std::string>* log, std::string name) : log_(log), name_(std::move(name)) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  absl::Status AllReduceSum(Buffer, absl::Duration) override { return Note("sum"); }
  absl::Status AllReduceMax(Buffer, absl::Duration) override { return Note("max"); }
  absl::Status AllGather(Buffer, Buffer, absl::Duration) override { return Note("gather"); }
  absl::Status ReduceScatterSum(Buffer, Buffer, absl::Duration) override { return Note("reduce_scatter"); }
  absl::Status AllToAll(Buffer, const std::vector<int64_t>&, Buffer, const std::vector<int64_t>&,
                        absl::Duration) override {
    return Note("all_to_all");
  }
  absl::Status Broadcast(Buffer, int, absl::Duration) override { return Note("broadcast"); }
  absl::Status Barrier(absl::Duration) override { return Note("barrier"); }

 private:
  absl::Status Note(const std::string& what) {
    log_->push_back(name_ + ":" + what);
    return absl::OkStatus();
  }
  std::vector<std::string>* log_;
  std::string name_;
};

TEST(RoutedCommunicatorTest, EachCallGoesToTheBackendOfItsMemory) {
  std::vector<std::string> log;
  auto c = MakeRoutedCommunicator(std::make_unique<Recording>(&log, "host"), std::make_unique<Recording>(&log, "dev"));
  float x = 0;
  const Buffer host{&x, 1, ElemType::kFloat32, false}, dev{&x, 1, ElemType::kFloat32, true};
  const absl::Duration t = absl::Seconds(1);
  ASSERT_TRUE(c->AllReduceSum(host, t).ok());
  ASSERT_TRUE(c->AllReduceSum(dev, t).ok());
  ASSERT_TRUE(c->AllReduceMax(dev, t).ok());
  ASSERT_TRUE(c->AllGather(dev, dev, t).ok());
  ASSERT_TRUE(c->ReduceScatterSum(host, host, t).ok());
  ASSERT_TRUE(c->AllToAll(dev, {1}, dev, {1}, t).ok());
  ASSERT_TRUE(c->Broadcast(host, 0, t).ok());
  ASSERT_TRUE(c->Barrier(t).ok());
  EXPECT_EQ(log, (std::vector<std::string>{"host:sum", "dev:sum", "dev:max", "dev:gather", "host:reduce_scatter",
                                           "dev:all_to_all", "host:broadcast", "host:barrier"}));
  EXPECT_EQ(c->size(), 1);
}

TEST(RoutedCommunicatorTest, MixedOrUnroutableCallsAreRefused) {
  std::vector<std::string> log;
  auto c = MakeRoutedCommunicator(std::make_unique<Recording>(&log, "host"), nullptr);
  float x = 0;
  const Buffer host{&x, 1, ElemType::kFloat32, false}, dev{&x, 1, ElemType::kFloat32, true};
  absl::Status mixed = c->AllGather(host, dev, absl::Seconds(1));
  EXPECT_TRUE(absl::IsInvalidArgument(mixed)) << mixed;
  EXPECT_NE(mixed.message().find("mixes a host and a device buffer"), std::string::npos) << mixed;
  absl::Status none = c->AllReduceSum(dev, absl::Seconds(1));
  EXPECT_TRUE(absl::IsFailedPrecondition(none)) << none;
  EXPECT_NE(none.message().find("without NCCL"), std::string::npos) << none;
  EXPECT_TRUE(log.empty());
  EXPECT_TRUE(c->AllReduceSum(host, absl::Seconds(1)).ok());
}

}  // namespace
}  // namespace lathe::parallel
