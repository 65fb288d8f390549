// Saving a checkpoint on one process: a save that fails midway leaves no
// partial folder, and an overwrite is not blocked by one that died before
// removing the checkpoint it replaced.
#include "runtime/checkpoint.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "runtime/tiny_model.h"
#include "runtime/trainer.h"
#include "tests/runtime/file_size_limit.h"
#include "tests/runtime/tiny_model_test.h"

namespace lathe::runtime {
namespace {

namespace fs = std::filesystem;

constexpr char kCheckpointTestName[] = "checkpoint_test";

class CheckpointTest : public TinyModelTest<kCheckpointTestName> {
 protected:
  void SetUp() override {
    TinyModelTest::SetUp();
    LoraSettings lora;
    lora.rank = 4;
    auto trainer = Trainer::Create({Model(), lora, 16, 0});
    ASSERT_TRUE(trainer.ok()) << trainer.status();
    trainer_ = *std::move(trainer);
  }

  absl::Status Save(const std::string& name, bool overwrite = false) {
    CheckpointMeta meta;
    meta.run_id = "run";
    meta.name = name;
    return SaveCheckpoint(*trainer_, root_ + "/" + name, overwrite, meta, {}, nullptr, absl::Seconds(10));
  }

  std::unique_ptr<Trainer> trainer_;
};

TEST_F(CheckpointTest, ASaveThatFailsMidwayLeavesNoPartialFolder) {
  ASSERT_TRUE(Save("whole").ok());
  absl::Status s;
  {
    FileSizeLimit cap(fs::file_size(root_ + "/whole/node_rank-0/rank-0.safetensors") / 2);
    s = Save("cut");
  }
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(Entries(), std::vector<std::string>{"whole"}) << s;
}

TEST_F(CheckpointTest, AnOverwriteIsNotBlockedByALeftoverReplacedFolder) {
  ASSERT_TRUE(Save("a").ok());
  // What an overwrite that died between its two renames leaves behind.
  fs::create_directories(root_ + "/a.replaced/node_rank-0");
  std::ofstream(root_ + "/a.replaced/manifest.json") << "{}";
  const absl::Status s = Save("a", /*overwrite=*/true);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(Entries(), std::vector<std::string>{"a"});
  auto step = LoadCheckpoint(*trainer_, root_ + "/a", /*with_optimizer=*/true, nullptr, absl::Seconds(10));
  EXPECT_TRUE(step.ok()) << step.status();
}

}  // namespace
}  // namespace lathe::runtime
