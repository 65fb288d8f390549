// Where this process sits: rank, world size, local rank on its node and node
// rank. MPI is the source of truth once initialised; launcher variables
// (Open MPI, slurm, PMIx, LeaderWorkerSet) are the fallback where MPI cannot
// say, and the check that MPI sees the world the launcher started.
#ifndef LATHE_PARALLEL_RANK_INFO_H_
#define LATHE_PARALLEL_RANK_INFO_H_

#include <functional>
#include <string>

#include "absl/status/statusor.h"

namespace lathe::parallel {

struct RankInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_size = 1;
  int node_rank = 0;
  int node_count = 1;
  std::string source;  // "mpi", "openmpi", "slurm", "pmix", "lws"

  bool operator==(const RankInfo& o) const {
    return rank == o.rank && world_size == o.world_size && local_rank == o.local_rank &&
           local_size == o.local_size && node_rank == o.node_rank && node_count == o.node_count;
  }
};

// Looks up an environment variable; nullptr when unset.
using EnvLookup = std::function<const char*(const char*)>;

// From launcher variables, first match wins: Open MPI (OMPI_COMM_WORLD_*),
// slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID,
// SLURM_NNODES), PMIx (PMIX_RANK with the slurm sizes), then LeaderWorkerSet
// (LWS_WORKER_INDEX of LWS_GROUP_SIZE pods, one process per pod). NotFound
// when no launcher set them; InvalidArgument naming a malformed variable.
absl::StatusOr<RankInfo> RankInfoFromEnv(const EnvLookup& env);

// Combines what MPI says with what the launcher says (pure). MPI wins when it
// answered; its error falls back to the launcher. FailedPrecondition when MPI
// sees a world of one while the launcher started several tasks — every task
// came up as its own MPI singleton (srun without --mpi=pmix, a missing PMI
// plugin) and would otherwise serve alone as rank 0.
absl::StatusOr<RankInfo> ReconcileRankInfo(const absl::StatusOr<RankInfo>& from_mpi,
                                           const absl::StatusOr<RankInfo>& from_env);

// ReconcileRankInfo(RankInfoFromMpi() when MPI is initialised, RankInfoFromEnv(env)).
// Collective when MPI is initialised: every rank calls it.
absl::StatusOr<RankInfo> DiscoverRankInfo(const EnvLookup& env);

// From MPI_COMM_WORLD: local rank and size by MPI_Comm_split_type(SHARED),
// node rank by numbering the node leaders. Collective: every rank calls it.
// REQUIRES: MPI is initialised.
absl::StatusOr<RankInfo> RankInfoFromMpi();

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_RANK_INFO_H_
