// A Communicator that sends each call to the backend of its buffers' memory.
#include <utility>

#include "absl/strings/str_cat.h"
#include "parallel/communicator.h"

namespace lathe::parallel {
namespace {

class RoutedCommunicator : public Communicator {
 public:
  RoutedCommunicator(std::unique_ptr<Communicator> host, std::unique_ptr<Communicator> device)
      : host_(std::move(host)), device_(std::move(device)) {}
  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }

  absl::Status AllReduceSum(Buffer buf, absl::Duration timeout) override {
    auto c = For("all_reduce", buf, buf);
    return c.ok() ? (*c)->AllReduceSum(buf, timeout) : c.status();
  }
  absl::Status AllReduceMax(Buffer buf, absl::Duration timeout) override {
    auto c = For("all_reduce", buf, buf);
    return c.ok() ? (*c)->AllReduceMax(buf, timeout) : c.status();
  }
  absl::Status AllGather(Buffer send, Buffer recv, absl::Duration timeout) override {
    auto c = For("all_gather", send, recv);
    return c.ok() ? (*c)->AllGather(send, recv, timeout) : c.status();
  }
  absl::Status ReduceScatterSum(Buffer send, Buffer recv, absl::Duration timeout) override {
    auto c = For("reduce_scatter", send, recv);
    return c.ok() ? (*c)->ReduceScatterSum(send, recv, timeout) : c.status();
  }
  absl::Status AllToAll(Buffer send, const std::vector<int64_t>& send_counts, Buffer recv,
                        const std::vector<int64_t>& recv_counts, absl::Duration timeout) override {
    auto c = For("all_to_all", send, recv);
    return c.ok() ? (*c)->AllToAll(send, send_counts, recv, recv_counts, timeout) : c.status();
  }
  absl::Status Broadcast(Buffer buf, int root, absl::Duration timeout) override {
    auto c = For("broadcast", buf, buf);
    return c.ok() ? (*c)->Broadcast(buf, root, timeout) : c.status();
  }
  // The host backend: a barrier moves no data.
  absl::Status Barrier(absl::Duration timeout) override { return host_->Barrier(timeout); }

 private:
  absl::StatusOr<Communicator*> For(const char* what, const Buffer& a, const Buffer& b) {
    if (a.device != b.device) {
      return absl::InvalidArgumentError(absl::StrCat(what, " mixes a host and a device buffer"));
    }
    if (!a.device) return host_.get();
    if (device_ == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          what, " on a CUDA buffer, but this group has no device backend (lathe built without NCCL)"));
    }
    return device_.get();
  }

  std::unique_ptr<Communicator> host_;
  std::unique_ptr<Communicator> device_;
};

}  // namespace

std::unique_ptr<Communicator> MakeRoutedCommunicator(std::unique_ptr<Communicator> host,
                                                     std::unique_ptr<Communicator> device) {
  return std::make_unique<RoutedCommunicator>(std::move(host), std::move(device));
}

}  // namespace lathe::parallel
