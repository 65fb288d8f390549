// Under mpirun at several world sizes: every collective of the MPI backend on
// uneven sizes with closed-form answers, sub-group communicators from the
// mesh, and a late peer turning into DeadlineExceeded instead of a hang. All
// ranks agree on the verdict.
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include "parallel/communicator.h"
#include "parallel/mesh.h"
#include "tests/mpi_verdict.h"

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

void Collectives(Communicator& c) {
  const int n = c.size(), r = c.rank();
  const absl::Duration t = absl::Seconds(30);
  std::vector<float> x(1007);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((r + 1) * (i % 13));
  Expect(c.AllReduceSum({x.data(), 1007, ElemType::kFloat32}, t).ok(), "all_reduce ran");
  // A buffer marked as device memory never reaches MPI.
  Expect(absl::IsFailedPrecondition(c.AllReduceSum({x.data(), 1007, ElemType::kFloat32, true}, t)),
         "a device buffer is refused by the MPI backend");
  bool ok = true;
  for (size_t i = 0; i < x.size(); ++i) ok &= x[i] == static_cast<float>(n * (n + 1) / 2 * (i % 13));
  Expect(ok, "all_reduce sum");

  std::vector<double> m(3);
  for (int i = 0; i < 3; ++i) m[i] = (i == 1) ? -1.0 * r : static_cast<double>((r * 7 + i) % n);
  Expect(c.AllReduceMax({m.data(), 3, ElemType::kFloat64}, t).ok(), "all_reduce max ran");
  Expect(m[1] == 0.0 && m[0] == n - 1 && m[2] == n - 1, "all_reduce max");

  std::vector<int64_t> mine(5), all(5 * n);
  for (int i = 0; i < 5; ++i) mine[i] = r * 10 + i;
  Expect(c.AllGather({mine.data(), 5, ElemType::kInt64}, {all.data(), 5 * n, ElemType::kInt64}, t).ok(), "all_gather ran");
  ok = true;
  for (int m = 0; m < n; ++m) for (int i = 0; i < 5; ++i) ok &= all[m * 5 + i] == m * 10 + i;
  Expect(ok, "all_gather blocks");

  std::vector<double> send(3 * n), recv(3);
  for (int j = 0; j < n; ++j) for (int k = 0; k < 3; ++k) send[j * 3 + k] = r + j * 100 + k;
  Expect(c.ReduceScatterSum({send.data(), 3 * n, ElemType::kFloat64}, {recv.data(), 3, ElemType::kFloat64}, t).ok(),
         "reduce_scatter ran");
  ok = true;
  for (int k = 0; k < 3; ++k) ok &= recv[k] == n * (n - 1) / 2.0 + n * (r * 100.0 + k);
  Expect(ok, "reduce_scatter sums");

  // Uneven all-to-all: s sends (s + d) % 3 + 1 elements to d, valued s·1000 + d·10 + k.
  std::vector<int64_t> sc(n), rc(n);
  std::vector<int32_t> out, in;
  for (int d = 0; d < n; ++d) {
    sc[d] = (r + d) % 3 + 1;
    rc[d] = (d + r) % 3 + 1;
    for (int k = 0; k < sc[d]; ++k) out.push_back(r * 1000 + d * 10 + k);
  }
  int64_t total_in = 0;
  for (int64_t v : rc) total_in += v;
  in.assign(total_in, -1);
  Expect(c.AllToAll({out.data(), static_cast<int64_t>(out.size()), ElemType::kInt32}, sc,
                    {in.data(), total_in, ElemType::kInt32}, rc, t).ok(), "all_to_all ran");
  ok = true;
  size_t pos = 0;
  for (int s = 0; s < n; ++s) for (int k = 0; k < rc[s]; ++k) ok &= in[pos++] == s * 1000 + r * 10 + k;
  Expect(ok, "all_to_all uneven blocks");

  std::vector<int64_t> b(4, r == n - 1 ? 77 : 0);
  Expect(c.Broadcast({b.data(), 4, ElemType::kInt64}, n - 1, t).ok() && b[3] == 77, "broadcast from last");
  Expect(c.Barrier(t).ok(), "barrier");
  std::vector<float> wrong(2);
  Expect(c.AllGather({wrong.data(), 2, ElemType::kFloat32}, {wrong.data(), 2, ElemType::kFloat32}, t).code() ==
             absl::StatusCode::kInvalidArgument || n == 1, "all_gather size check");
}

void LatePeer(int world_size) {
  std::vector<int> everyone;
  for (int i = 0; i < world_size; ++i) everyone.push_back(i);
  auto c = MakeMpiCommunicator(everyone);
  if (!c.ok() || world_size < 2) return;
  if (world_rank == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(800));
    Expect((*c)->Barrier(absl::Seconds(30)).ok(), "late peer's barrier completes");
  } else {
    auto start = std::chrono::steady_clock::now();
    absl::Status s = (*c)->Barrier(absl::Milliseconds(100));
    double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    Expect(s.code() == absl::StatusCode::kDeadlineExceeded, "barrier times out on a late peer");
    Expect(waited < 0.7, "timeout honoured");
    Expect((*c)->Barrier(absl::Seconds(1)).code() == absl::StatusCode::kFailedPrecondition,
           "broken communicator refuses calls");
  }
  MPI_Barrier(MPI_COMM_WORLD);  // lets the abandoned barrier finish before MPI_Finalize
}

}  // namespace
}  // namespace lathe::parallel

int main(int argc, char** argv) {
  using namespace lathe::parallel;
  MPI_Init(&argc, &argv);
  int world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  std::vector<int> everyone;
  for (int i = 0; i < world; ++i) everyone.push_back(i);
  {
    auto c = MakeMpiCommunicator(everyone);
    Expect(c.ok(), "world communicator");
    if (c.ok()) Collectives(**c);
  }
  if (world % 2 == 0) {  // tp groups of 2 from the mesh
    MeshShape shape{1, 1, world, 2, 1};
    RankPlace place = PlaceOf(shape, world_rank);
    auto c = MakeMpiCommunicator(place.tp_group);
    Expect(c.ok() && (*c)->size() == 2, "tp group communicator");
    if (c.ok()) Collectives(**c);
  }
  LatePeer(world);
  return lathe::tests::MpiVerdict(failures);
}
