// Launcher-variable parsing of each launcher, and refusals of malformed values.
#include "parallel/rank_info.h"

#include <gtest/gtest.h>

#include <map>

namespace lathe::parallel {
namespace {

EnvLookup Env(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  };
}

TEST(RankInfoTest, OpenMpiVariables) {
  auto info = RankInfoFromEnv(Env({{"OMPI_COMM_WORLD_RANK", "5"}, {"OMPI_COMM_WORLD_SIZE", "8"},
                                   {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"},
                                   {"OMPI_COMM_WORLD_NODE_RANK", "1"}}));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->source, "openmpi");
  EXPECT_EQ(info->rank, 5);
  EXPECT_EQ(info->local_rank, 1);
  EXPECT_EQ(info->node_rank, 1);  // 5 / 4, not OMPI_COMM_WORLD_NODE_RANK
  EXPECT_EQ(info->node_count, 2);
}

TEST(RankInfoTest, SlurmVariables) {
  auto info = RankInfoFromEnv(Env({{"SLURM_PROCID", "13"}, {"SLURM_NTASKS", "16"}, {"SLURM_LOCALID", "5"},
                                   {"SLURM_NTASKS_PER_NODE", "8"}, {"SLURM_NODEID", "1"}, {"SLURM_NNODES", "2"}}));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->source, "slurm");
  EXPECT_EQ(info->rank, 13);
  EXPECT_EQ(info->world_size, 16);
  EXPECT_EQ(info->local_rank, 5);
  EXPECT_EQ(info->node_rank, 1);
  EXPECT_EQ(info->node_count, 2);
}

TEST(RankInfoTest, PmixRankWithSlurmSizes) {
  auto info = RankInfoFromEnv(Env({{"PMIX_RANK", "3"}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", "1"},
                                   {"SLURM_NODEID", "1"}, {"SLURM_NNODES", "2"}}));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->source, "pmix");
  EXPECT_EQ(info->rank, 3);
  EXPECT_EQ(info->node_rank, 1);
}

TEST(RankInfoTest, RefusesMissingAndMalformedVariables) {
  EXPECT_EQ(RankInfoFromEnv(Env({})).status().code(), absl::StatusCode::kNotFound);
  auto bad = RankInfoFromEnv(Env({{"SLURM_PROCID", "x1"}, {"SLURM_NTASKS", "4"}}));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("SLURM_PROCID"), std::string::npos);
  auto inconsistent = RankInfoFromEnv(Env({{"OMPI_COMM_WORLD_RANK", "4"}, {"OMPI_COMM_WORLD_SIZE", "4"}}));
  EXPECT_EQ(inconsistent.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RankInfoTest, LeaderWorkerSetPodIndex) {
  auto info = RankInfoFromEnv(Env({{"LWS_WORKER_INDEX", "2"}, {"LWS_GROUP_SIZE", "4"},
                                   {"LWS_LEADER_ADDRESS", "lathe-0.lathe.default"}}));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->source, "lws");
  EXPECT_EQ(info->rank, 2);
  EXPECT_EQ(info->node_rank, 2);
  EXPECT_EQ(info->node_count, 4);
  EXPECT_EQ(info->local_rank, 0);
  EXPECT_FALSE(RankInfoFromEnv(Env({{"LWS_WORKER_INDEX", "4"}, {"LWS_GROUP_SIZE", "4"}})).ok());
}

TEST(RankInfoTest, MpiLauncherVariablesWinOverTheLeaderWorkerSetIndex) {
  // mpirun started from the LWS leader: every rank also sees its pod's index.
  auto info = RankInfoFromEnv(Env({{"OMPI_COMM_WORLD_RANK", "9"}, {"OMPI_COMM_WORLD_SIZE", "16"},
                                   {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "8"},
                                   {"LWS_WORKER_INDEX", "0"}, {"LWS_GROUP_SIZE", "2"}}));
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->source, "openmpi");
  EXPECT_EQ(info->rank, 9);
  EXPECT_EQ(info->node_rank, 1);
}

RankInfo Place(int rank, int world, const char* source) {
  RankInfo r;
  r.rank = rank;
  r.world_size = world;
  r.source = source;
  return r;
}

TEST(RankInfoTest, MpiIsTheSourceOfTruthAndLauncherTheFallback) {
  auto both = ReconcileRankInfo(Place(3, 4, "mpi"), Place(3, 4, "slurm"));
  ASSERT_TRUE(both.ok());
  EXPECT_EQ(both->source, "mpi");
  auto fallback = ReconcileRankInfo(absl::InternalError("no MPI"), Place(3, 4, "slurm"));
  ASSERT_TRUE(fallback.ok());
  EXPECT_EQ(fallback->source, "slurm");
  EXPECT_EQ(ReconcileRankInfo(absl::InternalError("no MPI"), absl::NotFoundError("none")).status().code(),
            absl::StatusCode::kFailedPrecondition);
  auto alone = ReconcileRankInfo(Place(0, 1, "mpi"), absl::NotFoundError("none"));
  ASSERT_TRUE(alone.ok());  // a single process started by hand
}

TEST(RankInfoTest, SingletonsUnderAMultiTaskLauncherAreRefused) {
  // srun without --mpi=pmix: every task is an MPI world of one.
  auto s = ReconcileRankInfo(Place(0, 1, "mpi"), Place(5, 16, "slurm"));
  ASSERT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.status().message().find("--mpi=pmix"), std::string::npos) << s.status();
}

}  // namespace
}  // namespace lathe::parallel
