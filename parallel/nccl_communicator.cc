// NCCL communicators with deadlines: enqueue on a private stream, then poll
// the communicator's async state and an event until done or the deadline.
#include "parallel/nccl_communicator.h"

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"

namespace lathe::parallel {
namespace {

ncclDataType_t NcclType(ElemType t) {
  switch (t) {
    case ElemType::kFloat32: return ncclFloat32;
    case ElemType::kFloat64: return ncclFloat64;
    case ElemType::kInt32: return ncclInt32;
    case ElemType::kInt64: return ncclInt64;
  }
  return ncclFloat32;
}

size_t ElemSize(ElemType t) {
  return (t == ElemType::kFloat64 || t == ElemType::kInt64) ? 8 : 4;
}

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

void Pause(absl::Duration& pause) {
  std::this_thread::sleep_for(absl::ToChronoMicroseconds(pause));
  pause = std::min(pause * 2, absl::Milliseconds(1));
}

// Waits until a non-blocking communicator leaves ncclInProgress.
absl::Status WaitComm(ncclComm_t comm, absl::Time deadline, const char* what) {
  absl::Duration pause = absl::Microseconds(1);
  while (true) {
    ncclResult_t state;
    ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return absl::InternalError(absl::StrCat(what, ": ", ncclGetErrorString(r)));
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) return absl::InternalError(absl::StrCat(what, ": ", ncclGetErrorString(state)));
    if (absl::Now() >= deadline) return absl::DeadlineExceededError(absl::StrCat(what, ": peers did not join in time"));
    Pause(pause);
  }
}

ncclConfig_t NonBlocking() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

class NcclCommunicator : public Communicator {
 public:
  // Owns `stream` when own_stream (destroyed after the communicator).
  NcclCommunicator(ncclComm_t comm, cudaStream_t stream, bool own_stream = false)
      : comm_(comm), stream_(stream), own_stream_(own_stream) {
    ncclCommUserRank(comm_, &rank_);
    ncclCommCount(comm_, &size_);
    cudaEventCreateWithFlags(&done_, cudaEventDisableTiming);
  }
  ~NcclCommunicator() override {
    if (!broken_) ncclCommDestroy(comm_);
    cudaEventDestroy(done_);
    if (own_stream_) cudaStreamDestroy(stream_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  ncclComm_t comm() const { return comm_; }

  absl::Status AllReduceSum(Buffer buf, absl::Duration timeout) override {
    return Run("all_reduce", timeout, [&] {
      return ncclAllReduce(buf.data, buf.data, buf.count, NcclType(buf.type), ncclSum, comm_, stream_);
    });
  }
  absl::Status AllReduceMax(Buffer buf, absl::Duration timeout) override {
    return Run("all_reduce", timeout, [&] {
      return ncclAllReduce(buf.data, buf.data, buf.count, NcclType(buf.type), ncclMax, comm_, stream_);
    });
  }
  absl::Status AllGather(Buffer send, Buffer recv, absl::Duration timeout) override {
    if (recv.count != send.count * size_) return SizeError("all_gather", recv.count, send.count * size_);
    return Run("all_gather", timeout, [&] {
      return ncclAllGather(send.data, recv.data, send.count, NcclType(send.type), comm_, stream_);
    });
  }
  absl::Status ReduceScatterSum(Buffer send, Buffer recv, absl::Duration timeout) override {
    if (send.count != recv.count * size_) return SizeError("reduce_scatter", send.count, recv.count * size_);
    return Run("reduce_scatter", timeout, [&] {
      return ncclReduceScatter(send.data, recv.data, recv.count, NcclType(send.type), ncclSum, comm_, stream_);
    });
  }
  absl::Status AllToAll(Buffer send, const std::vector<int64_t>& send_counts, Buffer recv,
                        const std::vector<int64_t>& recv_counts, absl::Duration timeout) override {
    if (static_cast<int>(send_counts.size()) != size_ || static_cast<int>(recv_counts.size()) != size_) {
      return absl::InvalidArgumentError(absl::StrCat("all_to_all: counts for ", send_counts.size(), " and ",
                                                     recv_counts.size(), " members, group has ", size_));
    }
    const size_t elem = ElemSize(send.type);
    return Run("all_to_all", timeout, [&] {
      ncclResult_t r = ncclGroupStart();
      int64_t so = 0, ro = 0;
      for (int j = 0; j < size_ && (r == ncclSuccess || r == ncclInProgress); ++j) {
        if (send_counts[j] > 0) {
          r = ncclSend(static_cast<char*>(send.data) + so * elem, send_counts[j], NcclType(send.type), j, comm_, stream_);
        }
        if (recv_counts[j] > 0 && (r == ncclSuccess || r == ncclInProgress)) {
          r = ncclRecv(static_cast<char*>(recv.data) + ro * elem, recv_counts[j], NcclType(recv.type), j, comm_, stream_);
        }
        so += send_counts[j];
        ro += recv_counts[j];
      }
      ncclResult_t end = ncclGroupEnd();
      return (r == ncclSuccess || r == ncclInProgress) ? end : r;
    });
  }
  absl::Status Broadcast(Buffer buf, int root, absl::Duration timeout) override {
    return Run("broadcast", timeout, [&] {
      return ncclBroadcast(buf.data, buf.data, buf.count, NcclType(buf.type), root, comm_, stream_);
    });
  }
  absl::Status Barrier(absl::Duration timeout) override {
    if (scratch_ == nullptr) {
      if (absl::Status s = CudaStatus(cudaMalloc(&scratch_, sizeof(float)), "barrier"); !s.ok()) return s;
    }
    return AllReduceSum({scratch_, 1, ElemType::kFloat32}, timeout);
  }

 private:
  static absl::Status SizeError(const char* what, int64_t got, int64_t want) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": buffer holds ", got, " elements, needs ", want));
  }

  // Enqueues `op` after the work already on the legacy default stream, then
  // polls until it finished or the deadline passed (which aborts the comm).
  template <typename Op>
  absl::Status Run(const char* what, absl::Duration timeout, Op op) {
    if (broken_ || CommunicationBroken()) {
      return absl::FailedPreconditionError("communicator is broken by an earlier timeout");
    }
    const absl::Time deadline = absl::Now() + timeout;
    if (absl::Status s = CudaStatus(cudaEventRecord(done_, cudaStreamLegacy), what); !s.ok()) return s;
    if (absl::Status s = CudaStatus(cudaStreamWaitEvent(stream_, done_, 0), what); !s.ok()) return s;
    ncclResult_t r = op();
    if (r != ncclSuccess && r != ncclInProgress) {
      return absl::InternalError(absl::StrCat(what, ": ", ncclGetErrorString(r)));
    }
    absl::Status s = WaitComm(comm_, deadline, what);
    if (s.ok()) s = CudaStatus(cudaEventRecord(done_, stream_), what);
    absl::Duration pause = absl::Microseconds(1);
    while (s.ok()) {
      cudaError_t q = cudaEventQuery(done_);
      if (q == cudaSuccess) return absl::OkStatus();
      if (q != cudaErrorNotReady) return CudaStatus(q, what);
      if (absl::Now() >= deadline) {
        s = absl::DeadlineExceededError(absl::StrCat(what, ": peers did not join in time"));
        break;
      }
      Pause(pause);
    }
    if (absl::IsDeadlineExceeded(s)) {
      ncclCommAbort(comm_);
      broken_ = true;
      MarkCommunicationBroken();
      return absl::DeadlineExceededError(absl::StrCat(what, " on rank ", rank_, " of ", size_,
                                                      ": peers did not join within ", absl::FormatDuration(timeout)));
    }
    return s;
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  const bool own_stream_;
  cudaEvent_t done_ = nullptr;
  void* scratch_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
  bool broken_ = false;
};

class NcclWorldImpl : public NcclWorld {
 public:
  NcclWorldImpl(std::unique_ptr<NcclCommunicator> world, cudaStream_t stream, absl::Duration timeout)
      : world_(std::move(world)), stream_(stream), timeout_(timeout) {}
  Communicator& world() override { return *world_; }

  absl::StatusOr<std::unique_ptr<Communicator>> Split(const std::vector<int>& world_ranks) override {
    int me = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    if (world_ranks.empty() || std::find(world_ranks.begin(), world_ranks.end(), me) == world_ranks.end()) {
      return absl::InvalidArgumentError(absl::StrCat("rank ", me, " is not in the group it splits into"));
    }
    ncclConfig_t config = NonBlocking();
    ncclComm_t comm = nullptr;
    ncclResult_t r = ncclCommSplit(world_->comm(), world_ranks.front(), me, &comm, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      return absl::InternalError(absl::StrCat("ncclCommSplit: ", ncclGetErrorString(r)));
    }
    if (absl::Status s = WaitComm(comm, absl::Now() + timeout_, "ncclCommSplit"); !s.ok()) return s;
    return std::unique_ptr<Communicator>(new NcclCommunicator(comm, stream_));
  }

 private:
  std::unique_ptr<NcclCommunicator> world_;
  cudaStream_t stream_;
  absl::Duration timeout_;
};

absl::Status UseDevice(int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA device ", device, " is not available (", count,
                                                      " visible)"));
  }
  return CudaStatus(cudaSetDevice(device), "cudaSetDevice");
}

// The group's NCCL id: drawn by member 0 and published, read by the others.
absl::Status ExchangeId(const StoreGroupOptions& o, RendezvousStore* store, ncclUniqueId* id) {
  const std::string key = absl::StrCat(o.group, "/nccl_id");
  if (o.rank == 0) {
    ncclResult_t r = ncclGetUniqueId(id);
    if (r != ncclSuccess) return absl::InternalError(absl::StrCat("ncclGetUniqueId: ", ncclGetErrorString(r)));
    return store->Set(o.generation, key, std::string(id->internal, sizeof(id->internal)));
  }
  absl::StatusOr<std::vector<std::string>> value = store->Get(o.generation, {key}, o.connect_timeout);
  if (!value.ok()) return value.status();
  if (value->front().size() != sizeof(id->internal)) {
    return absl::InternalError(absl::StrCat("the NCCL id in the store holds ", value->front().size(), " bytes, not ",
                                            sizeof(id->internal)));
  }
  std::memcpy(id->internal, value->front().data(), sizeof(id->internal));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicatorFromStore(const StoreGroupOptions& options,
                                                                            RendezvousStore* store, int device) {
  if (absl::Status s = ValidateStoreGroupOptions(options); !s.ok()) return s;
  const absl::Time deadline = absl::Now() + options.connect_timeout;
  if (absl::Status s = UseDevice(device); !s.ok()) return s;
  ncclUniqueId id;
  if (absl::Status s = ExchangeId(options, store, &id); !s.ok()) return s;
  cudaStream_t stream;
  if (absl::Status s = CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream"); !s.ok()) {
    return s;
  }
  ncclConfig_t config = NonBlocking();
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, options.size, id, options.rank, &config);
  absl::Status s = (r == ncclSuccess || r == ncclInProgress)
                       ? WaitComm(comm, deadline, "ncclCommInitRank")
                       : absl::InternalError(absl::StrCat("ncclCommInitRank: ", ncclGetErrorString(r)));
  if (!s.ok()) {
    if (comm != nullptr) ncclCommAbort(comm);
    cudaStreamDestroy(stream);
    return absl::Status(s.code(), absl::StrCat("forming NCCL group ", options.group, " of generation ",
                                               options.generation, " (rank ", options.rank, " of ", options.size,
                                               "): ", s.message()));
  }
  return std::unique_ptr<Communicator>(new NcclCommunicator(comm, stream, /*own_stream=*/true));
}

absl::StatusOr<std::unique_ptr<NcclWorld>> NcclWorld::Create(int device, absl::Duration timeout) {
  if (absl::Status s = UseDevice(device); !s.ok()) return s;
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  ncclUniqueId id;
  if (rank == 0) {
    ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) return absl::InternalError(absl::StrCat("ncclGetUniqueId: ", ncclGetErrorString(r)));
  }
  if (MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD) != MPI_SUCCESS) {
    return absl::InternalError("broadcasting the NCCL id over MPI failed");
  }
  cudaStream_t stream;
  if (absl::Status s = CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream"); !s.ok()) {
    return s;
  }
  ncclConfig_t config = NonBlocking();
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, size, id, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    return absl::InternalError(absl::StrCat("ncclCommInitRank: ", ncclGetErrorString(r)));
  }
  if (absl::Status s = WaitComm(comm, absl::Now() + timeout, "ncclCommInitRank"); !s.ok()) return s;
  return std::unique_ptr<NcclWorld>(
      new NcclWorldImpl(std::make_unique<NcclCommunicator>(comm, stream), stream, timeout));
}

}  // namespace lathe::parallel
