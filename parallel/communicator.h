// Collective communication inside one group of ranks, with a timeout on every
// call so a dead peer fails the caller instead of hanging it.
//
// Cross-rank rule: every member of the group calls the same collectives in the
// same order with matching sizes. After a call times out the communicator is
// broken (a collective cannot be withdrawn once posted): every later call
// returns FailedPrecondition; the process should leave the job.
#ifndef LATHE_PARALLEL_COMMUNICATOR_H_
#define LATHE_PARALLEL_COMMUNICATOR_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace lathe::parallel {

enum class ElemType { kFloat32, kFloat64, kInt32, kInt64 };

// A contiguous host (MPI) or device (NCCL) buffer of `count` elements.
struct Buffer {
  void* data = nullptr;
  int64_t count = 0;
  ElemType type = ElemType::kFloat32;
  bool device = false;  // CUDA device memory (see MakeRoutedCommunicator)
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;  // in the group
  virtual int size() const = 0;

  // In place: every member ends with the element-wise sum.
  virtual absl::Status AllReduceSum(Buffer buf, absl::Duration timeout) = 0;
  // In place: every member ends with the element-wise maximum.
  virtual absl::Status AllReduceMax(Buffer buf, absl::Duration timeout) = 0;
  // recv.count == size() × send.count; member i's data lands at i × send.count.
  virtual absl::Status AllGather(Buffer send, Buffer recv, absl::Duration timeout) = 0;
  // send.count == size() × recv.count; member i receives the sum of block i.
  virtual absl::Status ReduceScatterSum(Buffer send, Buffer recv, absl::Duration timeout) = 0;
  // Uneven all-to-all: send_counts[j] elements go to member j, recv_counts[j]
  // come from it, both packed in member order.
  virtual absl::Status AllToAll(Buffer send, const std::vector<int64_t>& send_counts, Buffer recv,
                                const std::vector<int64_t>& recv_counts, absl::Duration timeout) = 0;
  virtual absl::Status Broadcast(Buffer buf, int root, absl::Duration timeout) = 0;
  virtual absl::Status Barrier(absl::Duration timeout) = 0;
};

// Process-wide: whether any communicator of this process timed out. MPI can
// still complete an abandoned collective into memory its caller has since
// freed, so from then on every communicator refuses calls (no further MPI
// progress) and the process must leave the job.
bool CommunicationBroken();
// Marks the process's communication broken (backends call it on a timeout).
void MarkCommunicationBroken();

// An MPI communicator over the given world ranks (ascending, including this
// rank). Collective over MPI_COMM_WORLD: every world rank calls it with its
// own group, in the same order. REQUIRES: MPI is initialised with at least
// MPI_THREAD_FUNNELED.
absl::StatusOr<std::unique_ptr<Communicator>> MakeMpiCommunicator(const std::vector<int>& world_ranks);

// One group reached by two backends: calls on host buffers go to `host`
// (MPI), calls on device buffers (Buffer::device) to `device` (NCCL), so a
// rank on a GPU sums its CUDA tensors with NCCL and its host scalars (counts,
// norms, metrics) with MPI. Both cover the same ranks in the same order.
// `device` may be null: device buffers then fail with FailedPrecondition.
// A call mixing host and device buffers is InvalidArgument.
std::unique_ptr<Communicator> MakeRoutedCommunicator(std::unique_ptr<Communicator> host,
                                                     std::unique_ptr<Communicator> device);

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_COMMUNICATOR_H_
