// Rank discovery from MPI and from launcher variables.
#include "parallel/rank_info.h"

#include <mpi.h>

#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace lathe::parallel {
namespace {

// Reads an integer variable: -1 when unset, an error when malformed.
absl::StatusOr<int> IntVar(const EnvLookup& env, const char* name) {
  const char* v = env(name);
  if (v == nullptr) return -1;
  int out = 0;
  if (!absl::SimpleAtoi(v, &out) || out < 0) {
    return absl::InvalidArgumentError(absl::StrCat("launcher variable ", name, "='", v, "' is not a count"));
  }
  return out;
}

struct Names {
  const char* source;
  const char* rank;
  const char* size;
  const char* local_rank;
  const char* local_size;
  const char* node_rank;
  const char* node_count;
};

absl::Status MpiError(int code, const char* call) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  return absl::InternalError(absl::StrCat(call, ": ", std::string(text, len)));
}

}  // namespace

absl::StatusOr<RankInfo> RankInfoFromEnv(const EnvLookup& env) {
  static const Names kLaunchers[] = {
      {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
       // OMPI_COMM_WORLD_NODE_RANK is a rank on the node across jobs, not a
       // node index: the node rank is derived from a block placement instead.
       "OMPI_COMM_WORLD_LOCAL_SIZE", nullptr, nullptr},
      {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE",
       "SLURM_NODEID", "SLURM_NNODES"},
      {"pmix", "PMIX_RANK", "SLURM_NTASKS", "SLURM_LOCALID", nullptr, "SLURM_NODEID", "SLURM_NNODES"},
  };
  for (const Names& n : kLaunchers) {
    auto rank = IntVar(env, n.rank);
    auto size = IntVar(env, n.size);
    if (!rank.ok()) return rank.status();
    if (!size.ok()) return size.status();
    if (*rank < 0 || *size <= 0) continue;
    RankInfo info;
    info.source = n.source;
    info.rank = *rank;
    info.world_size = *size;
    // -1 marks a value no variable gave; derived below.
    int* targets[] = {&info.local_rank, &info.local_size, &info.node_rank, &info.node_count};
    const char* names[] = {n.local_rank, n.local_size, n.node_rank, n.node_count};
    for (int i = 0; i < 4; ++i) {
      *targets[i] = -1;
      if (names[i] == nullptr) continue;
      auto v = IntVar(env, names[i]);
      if (!v.ok()) return v.status();
      *targets[i] = *v;
    }
    if (info.local_rank < 0) info.local_rank = 0;
    if (info.local_size <= 0) {
      info.local_size = info.node_count > 0 ? (info.world_size + info.node_count - 1) / info.node_count : 1;
    }
    if (info.node_rank < 0) info.node_rank = info.rank / info.local_size;
    if (info.node_count <= 0) info.node_count = (info.world_size + info.local_size - 1) / info.local_size;
    if (info.rank >= info.world_size || info.local_rank >= info.local_size) {
      return absl::InvalidArgumentError(absl::StrCat(n.source, " launcher variables are inconsistent: rank ",
                                                     info.rank, " of ", info.world_size, ", local rank ",
                                                     info.local_rank, " of ", info.local_size));
    }
    return info;
  }
  // LeaderWorkerSet without MPI: one process per pod, the pod's index is its rank.
  auto index = IntVar(env, "LWS_WORKER_INDEX");
  auto group = IntVar(env, "LWS_GROUP_SIZE");
  if (!index.ok()) return index.status();
  if (!group.ok()) return group.status();
  if (*index >= 0 && *group > 0) {
    if (*index >= *group) {
      return absl::InvalidArgumentError(absl::StrCat("LWS_WORKER_INDEX ", *index, " is not below LWS_GROUP_SIZE ",
                                                     *group));
    }
    RankInfo info;
    info.source = "lws";
    info.rank = info.node_rank = *index;
    info.world_size = info.node_count = *group;
    return info;
  }
  return absl::NotFoundError(
      "no launcher variables (OMPI_COMM_WORLD_*, SLURM_*, PMIX_RANK, LWS_WORKER_INDEX) are set");
}

absl::StatusOr<RankInfo> ReconcileRankInfo(const absl::StatusOr<RankInfo>& from_mpi,
                                           const absl::StatusOr<RankInfo>& from_env) {
  if (!from_mpi.ok()) {
    if (from_env.ok()) return from_env;
    return absl::FailedPreconditionError(absl::StrCat("cannot tell this rank's place: MPI: ",
                                                      from_mpi.status().message(),
                                                      "; launcher: ", from_env.status().message()));
  }
  if (from_env.ok() && from_mpi->world_size == 1 && from_env->world_size > 1 && from_env->source != "lws") {
    return absl::FailedPreconditionError(absl::StrCat(
        "MPI sees a world of 1 rank but the launcher (", from_env->source, ") started ", from_env->world_size,
        " tasks: each came up alone; under slurm launch with srun --mpi=pmix (srun --mpi=list shows the "
        "plugins), under Kubernetes start the ranks with mpirun"));
  }
  return from_mpi;
}

absl::StatusOr<RankInfo> DiscoverRankInfo(const EnvLookup& env) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  absl::StatusOr<RankInfo> from_mpi =
      initialised ? RankInfoFromMpi() : absl::StatusOr<RankInfo>(absl::FailedPreconditionError("not initialised"));
  return ReconcileRankInfo(from_mpi, RankInfoFromEnv(env));
}

absl::StatusOr<RankInfo> RankInfoFromMpi() {
  RankInfo info;
  info.source = "mpi";
  if (int rc = MPI_Comm_rank(MPI_COMM_WORLD, &info.rank); rc != MPI_SUCCESS) return MpiError(rc, "MPI_Comm_rank");
  if (int rc = MPI_Comm_size(MPI_COMM_WORLD, &info.world_size); rc != MPI_SUCCESS) {
    return MpiError(rc, "MPI_Comm_size");
  }
  MPI_Comm node;
  if (int rc = MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, info.rank, MPI_INFO_NULL, &node);
      rc != MPI_SUCCESS) {
    return MpiError(rc, "MPI_Comm_split_type");
  }
  MPI_Comm_rank(node, &info.local_rank);
  MPI_Comm_size(node, &info.local_size);
  // Node leaders (local rank 0) number the nodes in world-rank order.
  MPI_Comm leaders;
  MPI_Comm_split(MPI_COMM_WORLD, info.local_rank == 0 ? 0 : MPI_UNDEFINED, info.rank, &leaders);
  int node_rank = 0, node_count = 0;
  if (leaders != MPI_COMM_NULL) {
    MPI_Comm_rank(leaders, &node_rank);
    MPI_Comm_size(leaders, &node_count);
    MPI_Comm_free(&leaders);
  }
  int values[2] = {node_rank, node_count};
  MPI_Bcast(values, 2, MPI_INT, 0, node);
  info.node_rank = values[0];
  info.node_count = values[1];
  MPI_Comm_free(&node);
  return info;
}

}  // namespace lathe::parallel
