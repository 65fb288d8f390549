// Saving a checkpoint on one process: a save that fails midway leaves no
// partial folder, an overwrite is not blocked by one that died before
// removing the checkpoint it replaced, and full fine-tuning's attention
// biases are saved and loaded.
#include "runtime/checkpoint.h"

#include <gtest/gtest.h>
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "runtime/decoder_model.h"
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

// Full fine-tuning of a model with attention biases: the biases are trained
// tensors under their checkpoint names, and a checkpoint carries them.
TEST(CheckpointBiasTest, FullFineTuningSavesAndLoadsTheAttentionBiases) {
  const std::string dir = ::testing::TempDir() + "/checkpoint_bias_test";
  fs::remove_all(dir);
  TinyModelSpec spec;
  spec.moe = false;
  spec.vocab_size = 64;
  spec.hidden_size = 32;
  spec.head_dim = 8;
  spec.attention_bias = true;
  ASSERT_TRUE(WriteTinyModel(dir + "/model", spec).ok());
  LoraSettings full;
  full.rank = 0;
  auto a = Trainer::Create({dir + "/model", full, 16, 0});
  auto b = Trainer::Create({dir + "/model", full, 16, 0});
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
  std::vector<std::string> biases;
  {
    at::NoGradGuard no_grad;
    for (TrainableParam& p : (*a)->model().trainable()) {
      if (p.name.find("_proj.bias") == std::string::npos) continue;
      biases.push_back(p.name);
      p.tensor.add_(0.25);
    }
  }
  std::sort(biases.begin(), biases.end());
  EXPECT_EQ(biases, (std::vector<std::string>{
                        "model.layers.0.self_attn.k_proj.bias", "model.layers.0.self_attn.o_proj.bias",
                        "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias",
                        "model.layers.1.self_attn.k_proj.bias", "model.layers.1.self_attn.o_proj.bias",
                        "model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.v_proj.bias"}));
  CheckpointMeta meta;
  meta.run_id = "run";
  meta.name = "biased";
  ASSERT_TRUE(SaveCheckpoint(**a, dir + "/ckpt", false, meta, {}, nullptr, absl::Seconds(10)).ok());
  auto step = LoadCheckpoint(**b, dir + "/ckpt", /*with_optimizer=*/false, nullptr, absl::Seconds(10));
  ASSERT_TRUE(step.ok()) << step.status();
  std::map<std::string, at::Tensor> loaded;
  for (const TrainableParam& p : (*b)->model().trainable()) loaded[p.name] = p.tensor;
  for (const TrainableParam& p : (*a)->model().trainable()) {
    ASSERT_TRUE(loaded.count(p.name)) << p.name;
    EXPECT_TRUE(at::equal(loaded[p.name], p.tensor)) << p.name;
  }
}

}  // namespace
}  // namespace lathe::runtime
