// The MPI backend of Communicator: non-blocking collectives polled against a
// deadline.
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "parallel/communicator.h"

namespace lathe::parallel {
namespace {

// Turns an MPI return code into a Status with the call site and MPI's text.
absl::Status MpiStatus(int code, const char* call, const char* file, int line) {
  if (code == MPI_SUCCESS) return absl::OkStatus();
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", call, ": ", std::string(text, len)));
}
#define LATHE_MPI_CHECK(call)                                              \
  do {                                                                     \
    ::absl::Status lathe_mpi_status_ = MpiStatus((call), #call, __FILE__, __LINE__); \
    if (!lathe_mpi_status_.ok()) return lathe_mpi_status_;                 \
  } while (0)

MPI_Datatype MpiType(ElemType t) {
  switch (t) {
    case ElemType::kFloat32: return MPI_FLOAT;
    case ElemType::kFloat64: return MPI_DOUBLE;
    case ElemType::kInt32: return MPI_INT32_T;
    case ElemType::kInt64: return MPI_INT64_T;
  }
  return MPI_FLOAT;
}

absl::StatusOr<std::vector<int>> IntCounts(const std::vector<int64_t>& counts, int size, const char* what) {
  if (static_cast<int>(counts.size()) != size) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has ", counts.size(), " entries for ", size, " members"));
  }
  std::vector<int> out;
  for (int64_t c : counts) {
    if (c < 0 || c > INT32_MAX) return absl::InvalidArgumentError(absl::StrCat(what, " holds ", c));
    out.push_back(static_cast<int>(c));
  }
  return out;
}

std::vector<int> Displacements(const std::vector<int>& counts) {
  std::vector<int> displs(counts.size(), 0);
  for (size_t i = 1; i < counts.size(); ++i) displs[i] = displs[i - 1] + counts[i - 1];
  return displs;
}

std::atomic<bool> g_communication_broken{false};

// The MPI backend reads host memory only: a device buffer here means a group
// without its NCCL twin (AttachNccl), refused before MPI touches it.
absl::Status HostOnly(const char* what, const Buffer& a, const Buffer& b) {
  if (!a.device && !b.device) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat(what, " on a CUDA buffer reached the MPI backend (a group without its NCCL twin)"));
}

#define LATHE_RETURN_IF_DEVICE(what, a, b)                               \
  do {                                                                   \
    if (absl::Status s = HostOnly(what, a, b); !s.ok()) return s;        \
  } while (0)

#define LATHE_RETURN_IF_BROKEN()                                                             \
  do {                                                                                       \
    if (broken_ || CommunicationBroken()) {                                                  \
      return absl::FailedPreconditionError("communicator is broken by an earlier timeout"); \
    }                                                                                        \
  } while (0)

class MpiCommunicator : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    if (!broken_) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  absl::Status AllReduceSum(Buffer buf, absl::Duration timeout) override {
    return AllReduce(buf, MPI_SUM, timeout);
  }
  absl::Status AllReduceMax(Buffer buf, absl::Duration timeout) override {
    return AllReduce(buf, MPI_MAX, timeout);
  }
  absl::Status AllGather(Buffer send, Buffer recv, absl::Duration timeout) override {
    LATHE_RETURN_IF_BROKEN();
    LATHE_RETURN_IF_DEVICE("all_gather", send, recv);
    if (recv.count != send.count * size_) return SizeError("all_gather", recv.count, send.count * size_);
    MPI_Request req;
    LATHE_MPI_CHECK(MPI_Iallgather(send.data, static_cast<int>(send.count), MpiType(send.type), recv.data,
                                   static_cast<int>(send.count), MpiType(recv.type), comm_, &req));
    return Wait(req, timeout, "all_gather");
  }
  absl::Status ReduceScatterSum(Buffer send, Buffer recv, absl::Duration timeout) override {
    LATHE_RETURN_IF_BROKEN();
    LATHE_RETURN_IF_DEVICE("reduce_scatter", send, recv);
    if (send.count != recv.count * size_) return SizeError("reduce_scatter", send.count, recv.count * size_);
    MPI_Request req;
    LATHE_MPI_CHECK(MPI_Ireduce_scatter_block(send.data, recv.data, static_cast<int>(recv.count),
                                              MpiType(send.type), MPI_SUM, comm_, &req));
    return Wait(req, timeout, "reduce_scatter");
  }
  absl::Status AllToAll(Buffer send, const std::vector<int64_t>& send_counts, Buffer recv,
                        const std::vector<int64_t>& recv_counts, absl::Duration timeout) override {
    LATHE_RETURN_IF_BROKEN();
    LATHE_RETURN_IF_DEVICE("all_to_all", send, recv);
    auto sc = IntCounts(send_counts, size_, "send_counts");
    if (!sc.ok()) return sc.status();
    auto rc = IntCounts(recv_counts, size_, "recv_counts");
    if (!rc.ok()) return rc.status();
    int64_t send_total = 0, recv_total = 0;
    for (int c : *sc) send_total += c;
    for (int c : *rc) recv_total += c;
    if (send_total > send.count) return SizeError("all_to_all send", send.count, send_total);
    if (recv_total > recv.count) return SizeError("all_to_all recv", recv.count, recv_total);
    std::vector<int> sd = Displacements(*sc), rd = Displacements(*rc);
    MPI_Request req;
    LATHE_MPI_CHECK(MPI_Ialltoallv(send.data, sc->data(), sd.data(), MpiType(send.type), recv.data, rc->data(),
                                   rd.data(), MpiType(recv.type), comm_, &req));
    return Wait(req, timeout, "all_to_all");
  }
  absl::Status Broadcast(Buffer buf, int root, absl::Duration timeout) override {
    LATHE_RETURN_IF_BROKEN();
    LATHE_RETURN_IF_DEVICE("broadcast", buf, buf);
    if (root < 0 || root >= size_) return absl::InvalidArgumentError(absl::StrCat("broadcast root ", root));
    MPI_Request req;
    LATHE_MPI_CHECK(MPI_Ibcast(buf.data, static_cast<int>(buf.count), MpiType(buf.type), root, comm_, &req));
    return Wait(req, timeout, "broadcast");
  }
  absl::Status Barrier(absl::Duration timeout) override {
    LATHE_RETURN_IF_BROKEN();
    MPI_Request req;
    LATHE_MPI_CHECK(MPI_Ibarrier(comm_, &req));
    return Wait(req, timeout, "barrier");
  }

 private:
  absl::Status AllReduce(Buffer buf, MPI_Op op, absl::Duration timeout) {
    LATHE_RETURN_IF_BROKEN();
    LATHE_RETURN_IF_DEVICE("all_reduce", buf, buf);
    MPI_Request req;
    LATHE_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buf.data, static_cast<int>(buf.count), MpiType(buf.type),
                                   op, comm_, &req));
    return Wait(req, timeout, "all_reduce");
  }
  static absl::Status SizeError(const char* what, int64_t got, int64_t want) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": buffer holds ", got, " elements, needs ", want));
  }

  // Polls until done or the deadline; a late peer breaks the communicator.
  absl::Status Wait(MPI_Request& req, absl::Duration timeout, const char* what) {
    const absl::Time start = absl::Now(), deadline = start + timeout;
    int done = 0;
    absl::Duration pause = absl::Microseconds(10);
    while (true) {
      LATHE_MPI_CHECK(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
      if (done) return absl::OkStatus();
      const absl::Time now = absl::Now();
      if (now >= deadline) break;
      // Spin for short collectives (a sleep costs ~60 us of timer slack),
      // then back off so a long wait leaves the core to the peers.
      if (now - start < absl::Microseconds(500)) continue;
      std::this_thread::sleep_for(absl::ToChronoMicroseconds(pause));
      pause = std::min(pause * 2, absl::Milliseconds(1));
    }
    broken_ = true;
    MarkCommunicationBroken();
    return absl::DeadlineExceededError(absl::StrCat(what, " on rank ", rank_, " of ", size_,
                                                    ": peers did not join within ", absl::FormatDuration(timeout)));
  }

  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  bool broken_ = false;
};

}  // namespace

bool CommunicationBroken() { return g_communication_broken.load(); }
void MarkCommunicationBroken() { g_communication_broken.store(true); }

absl::StatusOr<std::unique_ptr<Communicator>> MakeMpiCommunicator(const std::vector<int>& world_ranks) {
  MPI_Group world_group, group;
  LATHE_MPI_CHECK(MPI_Comm_group(MPI_COMM_WORLD, &world_group));
  LATHE_MPI_CHECK(MPI_Group_incl(world_group, static_cast<int>(world_ranks.size()), world_ranks.data(), &group));
  MPI_Comm comm;
  // Tag 0: groups are created in the same order on every rank.
  LATHE_MPI_CHECK(MPI_Comm_create_group(MPI_COMM_WORLD, group, 0, &comm));
  MPI_Group_free(&group);
  MPI_Group_free(&world_group);
  if (comm == MPI_COMM_NULL) {
    return absl::InvalidArgumentError(absl::StrCat("this rank is not in group [", absl::StrJoin(world_ranks, ", "), "]"));
  }
  return std::unique_ptr<Communicator>(new MpiCommunicator(comm));
}

}  // namespace lathe::parallel
