// allreduce_bench: bus bandwidth of the Communicator's all-reduce, 1 KiB to
// 256 MiB, next to a plain copy of the same bytes measured in the same run
// (memcpy on the host for MPI; a device-to-device copy for NCCL).
//
//   mpirun -np N build/bench/allreduce_bench [--backend mpi|nccl|gloo] [--max_mib 256]
//       [--coordinator HOST:PORT]
//
// gloo: the ranks form a Gloo group (TCP) through the rendezvous store of the
// coordinator at --coordinator ($LATHE_WORKER_TOKEN), as the replicas of a
// deployment would; MPI only starts the processes and times the calls.
//
// busbw = algbw · 2(n−1)/n, algbw = bytes / time: the bandwidth each rank's
// link sustains, comparable across world sizes (NCCL's convention).
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "dp_worker/link_store.h"
#include "parallel/communicator.h"
#include "parallel/gloo_communicator.h"
#ifdef LATHE_HAVE_NCCL
#include <cuda_runtime.h>

#include "parallel/nccl_communicator.h"
#endif

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a) { return std::chrono::duration<double>(Clock::now() - a).count(); }

// Runs fn enough times for ~0.2 s (at least 3) and returns seconds per call;
// the count is agreed over MPI_COMM_WORLD so every rank calls as often.
template <typename Fn>
double Time(Fn fn) {
  fn();  // warm-up
  auto t0 = Clock::now();
  fn();
  double once = Seconds(t0);
  MPI_Allreduce(MPI_IN_PLACE, &once, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  int iters = std::clamp(static_cast<int>(0.2 / std::max(once, 1e-9)), 3, 2000);
  MPI_Barrier(MPI_COMM_WORLD);
  t0 = Clock::now();
  for (int i = 0; i < iters; ++i) fn();
  double per = Seconds(t0) / iters;
  MPI_Allreduce(MPI_IN_PLACE, &per, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return per;
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rank = 0, n = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  std::string backend = "mpi";
  int64_t max_mib = 256;
  std::string coordinator;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--backend") == 0) backend = argv[i + 1];
    if (std::strcmp(argv[i], "--max_mib") == 0) max_mib = std::atoll(argv[i + 1]);
    if (std::strcmp(argv[i], "--coordinator") == 0) coordinator = argv[i + 1];
  }
  std::vector<int> all(n);
  std::iota(all.begin(), all.end(), 0);
  std::unique_ptr<lathe::parallel::Communicator> comm;
  const int64_t max_bytes = max_mib << 20;
  void *buf = nullptr, *src = nullptr, *dst = nullptr;
  bool device = false;
  std::unique_ptr<lathe::dp_worker::LinkStore> store;
  if (backend == "mpi" || backend == "gloo") {
    absl::StatusOr<std::unique_ptr<lathe::parallel::Communicator>> c;
    if (backend == "mpi") {
      c = lathe::parallel::MakeMpiCommunicator(all);
    } else {
      lathe::dp_worker::LinkOptions link;
      link.coordinator = coordinator;
      const char* token = std::getenv("LATHE_WORKER_TOKEN");
      link.worker_token = token ? token : "";
      link.connect_timeout = absl::Seconds(30);
      store = std::make_unique<lathe::dp_worker::LinkStore>(link);
      lathe::parallel::StoreGroupOptions o;
      o.rank = rank, o.size = n, o.hostname = "127.0.0.1";
      // A generation of its own (rank 0's clock): a store keeps the keys of
      // the last generation written, and an earlier run's addresses are dead.
      int64_t generation = absl::ToUnixMicros(absl::Now());
      MPI_Bcast(&generation, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
      o.generation = generation;
      c = lathe::parallel::MakeGlooCommunicator(o, store.get());
    }
    if (!c.ok()) {
      std::fprintf(stderr, "rank %d: %s\n", rank, c.status().ToString().c_str());
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    comm = std::move(*c);
    buf = std::malloc(max_bytes), src = std::malloc(max_bytes), dst = std::malloc(max_bytes);
    std::memset(buf, 0, max_bytes), std::memset(src, 1, max_bytes), std::memset(dst, 0, max_bytes);
  } else {
#ifdef LATHE_HAVE_NCCL
    int devices = 0;
    cudaGetDeviceCount(&devices);
    auto world = lathe::parallel::NcclWorld::Create(devices > 0 ? rank % devices : 0, absl::Minutes(2));
    if (!world.ok()) {
      std::fprintf(stderr, "rank %d: %s\n", rank, std::string(world.status().message()).c_str());
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    auto c = (*world)->Split(all);
    if (!c.ok()) MPI_Abort(MPI_COMM_WORLD, 1);
    comm = std::move(*c);
    cudaMalloc(&buf, max_bytes), cudaMalloc(&src, max_bytes), cudaMalloc(&dst, max_bytes);
    cudaMemset(buf, 0, max_bytes);
    device = true;
#else
    if (rank == 0) std::fprintf(stderr, "this build has no NCCL backend\n");
    MPI_Finalize();
    return 1;
#endif
  }
  if (rank == 0) {
    std::printf("# all_reduce (sum, float32), backend %s, %d ranks\n", backend.c_str(), n);
    std::printf("%12s %12s %12s %12s %12s %10s\n", "bytes", "time_us", "algbw_GB/s", "busbw_GB/s", "copy_GB/s",
                "bus/copy");
  }
  const absl::Duration timeout = absl::Minutes(2);
  for (int64_t bytes = 1024; bytes <= max_bytes; bytes *= 4) {
    const int64_t count = bytes / 4;
    double t = Time([&] {
      if (!comm->AllReduceSum({buf, count, lathe::parallel::ElemType::kFloat32}, timeout).ok()) {
        MPI_Abort(MPI_COMM_WORLD, 1);
      }
    });
    double copy = Time([&] {
#ifdef LATHE_HAVE_NCCL
      if (device) {
        cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice);
        return;
      }
#endif
      std::memcpy(dst, src, bytes);
    });
    const double algbw = bytes / t / 1e9;
    const double busbw = algbw * 2.0 * (n - 1) / n;
    double copybw = bytes / copy / 1e9;
    if (rank == 0) {
      std::printf("%12lld %12.1f %12.3f %12.3f %12.3f %10.3f\n", static_cast<long long>(bytes), t * 1e6, algbw, busbw,
                  copybw, busbw / copybw);
      std::fflush(stdout);
    }
  }
  if (!device) std::free(buf), std::free(src), std::free(dst);
  comm.reset();  // frees its MPI communicator: before MPI_Finalize
  MPI_Finalize();
  return 0;
}
