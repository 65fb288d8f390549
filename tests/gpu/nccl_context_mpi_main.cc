// Under mpirun, one rank per GPU: a ParallelContext with NCCL twins
// (AttachNccl) sums CUDA tensors over NCCL and host tensors over MPI through
// the same groups, and SyncGradients completes CUDA gradients across data
// replicas. Exits 77 on every rank, saying why, with fewer visible GPUs
// than ranks.
#include <ATen/ATen.h>
#include <mpi.h>

#include <cstdio>

#include "parallel/context.h"
#include "parallel/grad_sync.h"
#include "parallel/model_parallel.h"
#include "parallel/nccl_communicator.h"
#include "runtime/device.h"

namespace lathe::parallel {
namespace {

int failures = 0;

void Expect(bool ok, int rank, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "rank %d: FAILED %s\n", rank, what);
    ++failures;
  }
}

int Run(int rank, int n) {
  MeshShape shape;
  shape.replicas = n;
  shape.node_count = 1;
  shape.devices_per_node = 1;
  auto ctx = MakeMpiContext(shape, ModelDims{2, 2, 0, 8}, absl::Seconds(60));
  if (!ctx.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, ctx.status().ToString().c_str());
    return 1;
  }
  if (absl::Status s = AttachNccl(**ctx, rank); !s.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, s.ToString().c_str());
    return 1;
  }
  const at::Device cuda(at::kCUDA, static_cast<c10::DeviceIndex>(rank));
  const Group world{(*ctx)->world.get(), (*ctx)->timeout};
  // (seed, rank) inputs with closed-form sums.
  at::Tensor x = (at::arange(1000, at::kFloat) * (rank + 1)).to(cuda);
  AllReduceSumInPlace(x, world);
  Expect(x.is_cuda(), rank, "the sum stays on the device");
  Expect(at::equal(x.cpu(), at::arange(1000, at::kFloat) * (n * (n + 1) / 2)), rank, "NCCL all-reduce sum");
  at::Tensor h = at::full({3}, static_cast<double>(rank), at::kDouble);
  AllReduceSumInPlace(h, world);
  Expect(at::equal(h, at::full({3}, n * (n - 1) / 2.0, at::kDouble)), rank, "MPI all-reduce of a host tensor");
  std::vector<runtime::TrainableParam> params(2);
  params[0].name = "dense";
  params[0].tensor = at::zeros({5, 7}, at::TensorOptions(at::kFloat).device(cuda)).requires_grad_(true);
  params[0].tensor.mutable_grad() = at::full({5, 7}, static_cast<double>(rank + 1), params[0].tensor.options());
  params[1].name = "no_grad_here";
  params[1].tensor = at::zeros({4}, at::TensorOptions(at::kFloat).device(cuda)).requires_grad_(true);
  SyncGradients(params, **ctx);
  Expect(at::equal(params[0].tensor.grad().cpu(), at::full({5, 7}, n * (n + 1) / 2.0, at::kFloat)), rank,
         "SyncGradients sums CUDA gradients over the data replicas");
  Expect(params[1].tensor.grad().is_cuda() && params[1].tensor.grad().abs().sum().item<double>() == 0, rank,
         "an undefined gradient joins as zeros on the device");
  const double norm = GlobalGradNorm(params, **ctx);
  Expect(std::abs(norm - std::sqrt(35.0) * n * (n + 1) / 2.0) < 1e-3, rank, "global norm");
  int bad = failures;
  MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) std::printf("%s: %d failures over %d ranks\n", bad == 0 ? "PASS" : "FAIL", bad, n);
  return bad == 0 ? 0 : 1;
}

}  // namespace
}  // namespace lathe::parallel

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rank = 0, n = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  const int visible = lathe::runtime::CudaAvailable() ? static_cast<int>(at::getNumGPUs()) : 0;
  int rc = 77;
  if (visible < n) {
    if (rank == 0) std::printf("SKIP: %d ranks need %d GPUs, %d visible to libtorch\n", n, n, visible);
  } else {
    rc = lathe::parallel::Run(rank, n);
  }
  MPI_Finalize();
  return rc;
}
