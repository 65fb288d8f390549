// Device choice from the local rank and what the launcher shows.
#include "parallel/device.h"

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

RankInfo Local(int local_rank, int local_size) {
  RankInfo r;
  r.local_rank = local_rank;
  r.local_size = local_size;
  return r;
}

TEST(DeviceTest, LocalRankPicksAmongTheNodesDevices) {
  auto d = ChooseDevice(Local(5, 8), Env({}), 8);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->index, 5);
  EXPECT_EQ(d->visible, 8);
  d = ChooseDevice(Local(3, 4), Env({{"CUDA_VISIBLE_DEVICES", "4,5,6,7"}}), 8);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->index, 3);  // an ordinal among the visible ones, not the physical 7
}

TEST(DeviceTest, OneVisibleDeviceIsDeviceZeroWhateverTheLocalRank) {
  // slurm --gpus-per-task=1, or one GPU per container: each task sees its own.
  auto d = ChooseDevice(Local(6, 8), Env({{"CUDA_VISIBLE_DEVICES", "6"}}), 8);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->index, 0);
  d = ChooseDevice(Local(1, 2), Env({{"CUDA_VISIBLE_DEVICES", "GPU-8e6d1c2a-0000"}}), 0);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->index, 0);
}

TEST(DeviceTest, NoDeviceMeansCpu) {
  for (const char* hidden : {"", "-1", "NoDevFiles", "-1,0"}) {
    auto d = ChooseDevice(Local(1, 4), Env({{"CUDA_VISIBLE_DEVICES", hidden}}), 8);
    ASSERT_TRUE(d.ok()) << hidden;
    EXPECT_EQ(d->index, -1) << hidden;
  }
  auto d = ChooseDevice(Local(1, 4), Env({}), 0);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->index, -1);
}

TEST(DeviceTest, MoreRanksThanDevicesIsRefused) {
  auto d = ChooseDevice(Local(2, 4), Env({{"CUDA_VISIBLE_DEVICES", "0,1"}}), 8);
  ASSERT_EQ(d.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(d.status().message().find("4 ranks on this node share 2"), std::string::npos) << d.status();
  EXPECT_FALSE(ChooseDevice(Local(2, 4), Env({}), 2).ok());
}

}  // namespace
}  // namespace lathe::parallel
