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

namespace lathe::runtime {
namespace {

namespace fs = std::filesystem;

class CheckpointTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    TinyModelSpec spec;
    spec.vocab_size = 64;
    spec.hidden_size = 32;
    spec.head_dim = 8;
    spec.num_experts = 4;
    ASSERT_TRUE(WriteTinyModel(Model(), spec).ok());
  }
  static std::string Model() { return ::testing::TempDir() + "/checkpoint_test_model"; }

  void SetUp() override {
    root_ = ::testing::TempDir() + "/checkpoint_test/" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(root_);
    fs::create_directories(root_);
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
  std::vector<std::string> Entries() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(root_)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

  std::string root_;
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
