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

}  // namespace
}  // namespace lathe::parallel
