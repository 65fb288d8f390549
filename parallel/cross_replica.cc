// Two-level collectives: inside the job, then across the replicas.
#include "parallel/cross_replica.h"

#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"

namespace lathe::parallel {
namespace {

size_t ElemBytes(ElemType t) {
  switch (t) {
    case ElemType::kFloat32:
    case ElemType::kInt32: return 4;
    case ElemType::kFloat64:
    case ElemType::kInt64: return 8;
  }
  return 8;
}

class TwoLevelCommunicator : public Communicator {
 public:
  TwoLevelCommunicator(std::unique_ptr<Communicator> intra, std::shared_ptr<CrossReplicaSlot> slot)
      : intra_(std::move(intra)), slot_(std::move(slot)) {}

  int rank() const override { return CrossRank() * intra_->size() + intra_->rank(); }
  int size() const override { return CrossSize() * intra_->size(); }

  absl::Status AllReduceSum(Buffer buf, absl::Duration timeout) override {
    if (absl::Status s = intra_->AllReduceSum(buf, timeout); !s.ok()) return s;
    return Agree(Cross([&](Communicator& c) { return c.AllReduceSum(buf, timeout); }), timeout);
  }
  absl::Status AllReduceMax(Buffer buf, absl::Duration timeout) override {
    if (absl::Status s = intra_->AllReduceMax(buf, timeout); !s.ok()) return s;
    return Agree(Cross([&](Communicator& c) { return c.AllReduceMax(buf, timeout); }), timeout);
  }
  absl::Status AllGather(Buffer send, Buffer recv, absl::Duration timeout) override {
    if (send.device || recv.device) return DeviceRefused();
    if (recv.count != static_cast<int64_t>(size()) * send.count || recv.type != send.type) {
      return absl::InvalidArgumentError(absl::StrCat("all_gather: receive count ", recv.count, " for ", size(),
                                                     " members of ", send.count));
    }
    std::vector<char> mine(ElemBytes(send.type) * send.count * intra_->size());
    Buffer local{mine.data(), send.count * intra_->size(), send.type};
    if (absl::Status s = intra_->AllGather(send, local, timeout); !s.ok()) return s;
    if (slot_->group != nullptr && slot_->group->size() == 1) {
      std::memcpy(recv.data, mine.data(), mine.size());  // the only replica: its part is the whole
      return Agree(absl::OkStatus(), timeout);
    }
    return Agree(Cross([&](Communicator& c) { return c.AllGather(local, recv, timeout); }), timeout);
  }
  absl::Status ReduceScatterSum(Buffer, Buffer, absl::Duration) override {
    return absl::UnimplementedError("reduce_scatter over a group spanning separate replica jobs");
  }
  absl::Status AllToAll(Buffer, const std::vector<int64_t>&, Buffer, const std::vector<int64_t>&,
                        absl::Duration) override {
    return absl::UnimplementedError("all_to_all over a group spanning separate replica jobs");
  }
  absl::Status Broadcast(Buffer buf, int root, absl::Duration timeout) override {
    if (root < 0 || root >= size()) return absl::InvalidArgumentError(absl::StrCat("broadcast root ", root));
    const int root_cross = root / intra_->size(), root_intra = root % intra_->size();
    absl::Status cross;
    if (intra_->rank() == root_intra) cross = Cross([&](Communicator& c) { return c.Broadcast(buf, root_cross, timeout); });
    if (absl::Status s = Agree(cross, timeout); !s.ok()) return s;
    return intra_->Broadcast(buf, root_intra, timeout);
  }
  absl::Status Barrier(absl::Duration timeout) override {
    if (absl::Status s = intra_->Barrier(timeout); !s.ok()) return s;
    return Agree(Cross([&](Communicator& c) { return c.Barrier(timeout); }), timeout);
  }

 private:
  int CrossRank() const { return slot_->group == nullptr ? 0 : slot_->group->rank(); }
  int CrossSize() const { return slot_->group == nullptr ? 1 : slot_->group->size(); }

  static absl::Status DeviceRefused() {
    return absl::FailedPreconditionError("a group spanning separate replica jobs carries host buffers only");
  }

  template <typename F>
  absl::Status Cross(F call) {
    if (slot_->group == nullptr) {
      return absl::FailedPreconditionError("this replica holds no cross-replica group (none formed yet, or lost)");
    }
    if (slot_->group->size() == 1) return absl::OkStatus();
    return call(*slot_->group);
  }

  // Every member of intra_ learns whether any member's cross part failed.
  absl::Status Agree(const absl::Status& mine, absl::Duration timeout) {
    int32_t failed = mine.ok() ? 0 : 1;
    if (intra_->size() > 1) {
      if (absl::Status s = intra_->AllReduceMax({&failed, 1, ElemType::kInt32}, timeout); !s.ok()) return s;
    }
    if (!mine.ok()) return mine;
    if (failed != 0) {
      return absl::UnavailableError("the cross-replica part of a collective failed on another rank of this replica");
    }
    return absl::OkStatus();
  }

  std::unique_ptr<Communicator> intra_;
  std::shared_ptr<CrossReplicaSlot> slot_;
};

}  // namespace

std::unique_ptr<Communicator> MakeTwoLevelCommunicator(std::unique_ptr<Communicator> intra,
                                                       std::shared_ptr<CrossReplicaSlot> slot) {
  return std::make_unique<TwoLevelCommunicator>(std::move(intra), std::move(slot));
}

}  // namespace lathe::parallel
