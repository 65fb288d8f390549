// Under mpirun (3 ranks as one replica): the op boundary's agreement. Every
// rank ends with the same outcome: OK only when all succeeded, else the first
// failure in rank order (named by rank for the others), and "mixed" exactly
// when some ranks succeeded. All ranks agree on the verdict.
#include <mpi.h>

#include <cstdio>
#include <string>

#include "dp_worker/op_outcome.h"
#include "tests/mpi_verdict.h"

namespace lathe::dp_worker {
namespace {

int failures = 0;
int world_rank = 0;

void Expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "rank %d: FAILED %s\n", world_rank, what.c_str());
    ++failures;
  }
}

void Agreement(parallel::Communicator& replica) {
  const absl::Duration t = absl::Seconds(30);
  Outcome all_ok = AgreeOutcome(absl::OkStatus(), &replica, t);
  Expect(all_ok.status.ok() && !all_ok.mixed, "all ranks OK: OK, not mixed");

  // Rank 1 alone fails (an exception on one rank, say).
  const absl::Status mine = world_rank == 1 ? absl::InternalError("boom") : absl::OkStatus();
  Outcome one = AgreeOutcome(mine, &replica, t);
  Expect(one.status.code() == absl::StatusCode::kInternal, "one failure reaches every rank");
  Expect(one.mixed, "one failure among successes is mixed");
  const std::string want = world_rank == 1 ? "boom" : "boom (on rank 1 of the replica)";
  Expect(one.status.message() == want, "message: " + std::string(one.status.message()));

  // Every rank fails: the first in rank order wins, nothing is mixed.
  Outcome every = AgreeOutcome(absl::InvalidArgumentError("bad " + std::to_string(world_rank)), &replica, t);
  Expect(every.status.code() == absl::StatusCode::kInvalidArgument && !every.mixed, "all failed: not mixed");
  Expect(world_rank == 0 ? every.status.message() == "bad 0"
                         : every.status.message() == "bad 0 (on rank 0 of the replica)",
         "first failure wins: " + std::string(every.status.message()));

  // Without a replica communicator the rank's own status stands.
  Outcome alone = AgreeOutcome(mine, nullptr, t);
  Expect(alone.status.code() == mine.code() && !alone.mixed, "no communicator: own status");
}

}  // namespace
}  // namespace lathe::dp_worker

int main(int argc, char** argv) {
  using namespace lathe::dp_worker;
  MPI_Init(&argc, &argv);
  int world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  std::vector<int> everyone;
  for (int i = 0; i < world; ++i) everyone.push_back(i);
  {
    auto c = lathe::parallel::MakeMpiCommunicator(everyone);
    Expect(c.ok(), "replica communicator");
    if (c.ok()) Agreement(**c);
  }
  return lathe::tests::MpiVerdict(failures);
}
