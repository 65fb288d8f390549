// Under mpirun, one rank per GPU: every collective of the NCCL backend on
// device buffers of uneven sizes with closed-form answers, and a group split
// from the world. Exits 77 (skipped) where no CUDA device is visible.
#include <cuda_runtime.h>
#include <mpi.h>

#include <cstdio>
#include <vector>

#include "parallel/nccl_communicator.h"

namespace lathe::parallel {
namespace {

int failures = 0;
int world_rank = 0;

void Expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "rank %d: FAILED %s\n", world_rank, what);
    ++failures;
  }
}

template <typename T>
T* Device(const std::vector<T>& host) {
  T* d = nullptr;
  cudaMalloc(&d, std::max<size_t>(host.size(), 1) * sizeof(T));
  cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

template <typename T>
std::vector<T> Host(const T* d, size_t n) {
  std::vector<T> h(n);
  cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return h;
}

void Collectives(Communicator& c) {
  const int n = c.size(), r = c.rank();
  const absl::Duration t = absl::Seconds(60);
  std::vector<float> x(1007);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((r + 1) * (i % 13));
  float* dx = Device(x);
  Expect(c.AllReduceSum({dx, 1007, ElemType::kFloat32}, t).ok(), "all_reduce ran");
  auto hx = Host(dx, 1007);
  bool ok = true;
  for (size_t i = 0; i < x.size(); ++i) ok &= hx[i] == static_cast<float>(n * (n + 1) / 2 * (i % 13));
  Expect(ok, "all_reduce sum");
  Expect(c.AllReduceMax({dx, 1007, ElemType::kFloat32}, t).ok(), "all_reduce max ran");

  std::vector<int64_t> mine(5);
  for (int i = 0; i < 5; ++i) mine[i] = r * 10 + i;
  int64_t* dm = Device(mine);
  int64_t* da = Device(std::vector<int64_t>(5 * n));
  Expect(c.AllGather({dm, 5, ElemType::kInt64}, {da, 5 * n, ElemType::kInt64}, t).ok(), "all_gather ran");
  auto all = Host(da, 5 * n);
  ok = true;
  for (int m = 0; m < n; ++m) for (int i = 0; i < 5; ++i) ok &= all[m * 5 + i] == m * 10 + i;
  Expect(ok, "all_gather blocks");

  std::vector<double> send(3 * n);
  for (int j = 0; j < n; ++j) for (int k = 0; k < 3; ++k) send[j * 3 + k] = r + j * 100 + k;
  double* ds = Device(send);
  double* dr = Device(std::vector<double>(3));
  Expect(c.ReduceScatterSum({ds, 3 * n, ElemType::kFloat64}, {dr, 3, ElemType::kFloat64}, t).ok(), "reduce_scatter ran");
  auto recv = Host(dr, 3);
  ok = true;
  for (int k = 0; k < 3; ++k) ok &= recv[k] == n * (n - 1) / 2.0 + n * (r * 100.0 + k);
  Expect(ok, "reduce_scatter sums");

  std::vector<int64_t> sc(n), rc(n);
  std::vector<int32_t> out;
  int64_t total_in = 0;
  for (int d = 0; d < n; ++d) {
    sc[d] = (r + d) % 3 + 1;
    rc[d] = (d + r) % 3 + 1;
    total_in += rc[d];
    for (int k = 0; k < sc[d]; ++k) out.push_back(r * 1000 + d * 10 + k);
  }
  int32_t* dout = Device(out);
  int32_t* din = Device(std::vector<int32_t>(total_in));
  Expect(c.AllToAll({dout, static_cast<int64_t>(out.size()), ElemType::kInt32}, sc, {din, total_in, ElemType::kInt32}, rc, t).ok(),
         "all_to_all ran");
  auto in = Host(din, total_in);
  ok = true;
  size_t pos = 0;
  for (int s = 0; s < n; ++s) for (int k = 0; k < rc[s]; ++k) ok &= in[pos++] == s * 1000 + r * 10 + k;
  Expect(ok, "all_to_all uneven blocks");

  std::vector<float> b(9, r == n - 1 ? 4.5f : 0.f);
  float* db = Device(b);
  Expect(c.Broadcast({db, 9, ElemType::kFloat32}, n - 1, t).ok(), "broadcast ran");
  auto hb = Host(db, 9);
  ok = true;
  for (float v : hb) ok &= v == 4.5f;
  Expect(ok, "broadcast value");
  Expect(c.Barrier(t).ok(), "barrier");
  for (void* p : {static_cast<void*>(dx), static_cast<void*>(dm), static_cast<void*>(da), static_cast<void*>(ds),
                  static_cast<void*>(dr), static_cast<void*>(dout), static_cast<void*>(din), static_cast<void*>(db)}) {
    cudaFree(p);
  }
}

}  // namespace
}  // namespace lathe::parallel

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &lathe::parallel::world_rank);
  int size = 0, devices = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  int min_devices = devices;
  MPI_Allreduce(&devices, &min_devices, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (min_devices == 0) {
    if (lathe::parallel::world_rank == 0) std::printf("SKIP: no CUDA device visible\n");
    MPI_Finalize();
    return 77;
  }
  auto world = lathe::parallel::NcclWorld::Create(lathe::parallel::world_rank % devices, absl::Seconds(120));
  if (!world.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", lathe::parallel::world_rank, std::string(world.status().message()).c_str());
    ++lathe::parallel::failures;
  } else {
    lathe::parallel::Collectives((*world)->world());
    // Halves of the world (or the world itself at one rank).
    const int half = lathe::parallel::world_rank < (size + 1) / 2 ? 0 : 1;
    std::vector<int> group;
    for (int r = 0; r < size; ++r) {
      if ((r < (size + 1) / 2 ? 0 : 1) == half) group.push_back(r);
    }
    auto sub = (*world)->Split(group);
    lathe::parallel::Expect(sub.ok(), "split");
    if (sub.ok()) lathe::parallel::Collectives(**sub);
  }
  int total = 0;
  MPI_Allreduce(&lathe::parallel::failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (lathe::parallel::world_rank == 0) std::printf("%s: %d failures over %d ranks\n", total ? "FAIL" : "PASS", total, size);
  MPI_Finalize();
  return total == 0 ? 0 : 1;
}
