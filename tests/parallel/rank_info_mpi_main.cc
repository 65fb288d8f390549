// Under mpirun: every rank derives its place from MPI and from Open MPI's
// variables, the two must agree, and all ranks agree on the verdict.
#include <mpi.h>

#include <cstdio>
#include <cstdlib>

#include "parallel/rank_info.h"
#include "tests/mpi_verdict.h"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int failures = 0;
  auto from_mpi = lathe::parallel::RankInfoFromMpi();
  auto from_env = lathe::parallel::RankInfoFromEnv([](const char* n) { return std::getenv(n); });
  if (!from_mpi.ok() || !from_env.ok()) {
    ++failures;
  } else if (!(*from_mpi == *from_env)) {
    std::fprintf(stderr, "rank %d: mpi says local %d/%d node %d/%d, launcher says local %d/%d node %d/%d\n",
                 from_mpi->rank, from_mpi->local_rank, from_mpi->local_size, from_mpi->node_rank,
                 from_mpi->node_count, from_env->local_rank, from_env->local_size, from_env->node_rank,
                 from_env->node_count);
    ++failures;
  }
  return lathe::tests::MpiVerdict(failures);
}
