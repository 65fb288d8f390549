// The end of a test run under mpirun: every rank agrees on the verdict.
#ifndef LATHE_TESTS_MPI_VERDICT_H_
#define LATHE_TESTS_MPI_VERDICT_H_

#include <mpi.h>

#include <cstdio>

namespace lathe::tests {

// Sums `failures` over MPI_COMM_WORLD, prints PASS or FAIL with the total on
// rank 0, finalizes MPI and returns the process's exit code (0 only when no
// rank failed). Collective: every rank calls it last.
inline int MpiVerdict(int failures) {
  int total = 0, rank = 0, world = 1;
  MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  if (rank == 0) std::printf("%s: %d failure(s) over %d ranks\n", total == 0 ? "PASS" : "FAIL", total, world);
  MPI_Finalize();
  return total == 0 ? 0 : 1;
}

}  // namespace lathe::tests

#endif  // LATHE_TESTS_MPI_VERDICT_H_
