// The PEFT export's files and failures: nothing is left behind by a failed
// export, a missing base tensor is named as such, the expiry saturates.
#include "runtime/peft_export.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>

#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "runtime/decoder_model.h"
#include "core/safetensors.h"
#include "runtime/tiny_model.h"
#include "runtime/trainer.h"
#include "tests/runtime/file_size_limit.h"
#include "tests/runtime/tiny_model_test.h"

namespace lathe::runtime {
namespace {

namespace fs = std::filesystem;

constexpr char kPeftExportTestName[] = "peft_export_test";

class PeftExportTest : public TinyModelTest<kPeftExportTestName> {
 protected:
  void SetUp() override {
    TinyModelTest::SetUp();
    lora_.rank = 4;
    lora_.alpha = 8.0;
    auto trainer = Trainer::Create({Model(), lora_, 16, 0});
    ASSERT_TRUE(trainer.ok()) << trainer.status();
    for (const TrainableParam& p : (*trainer)->model().trainable()) params_[p.name] = p.tensor.detach().clone();
  }

  absl::Status Export(const std::string& name, const std::string& base = "", int64_t ttl_seconds = 0) {
    return WritePeftAdapter(params_, lora_, root_ + "/" + name, {"tiny", base, ttl_seconds, ""});
  }
  nlohmann::json Sampler(const std::string& name) const {
    std::ifstream in(root_ + "/" + name + "/lathe_sampler.json");
    return nlohmann::json::parse(in);
  }

  LoraSettings lora_;
  std::map<std::string, at::Tensor> params_;
};

TEST_F(PeftExportTest, ExpiryIsNowPlusTtlAndSaturatesForHugeTtl) {
  ASSERT_TRUE(Export("none").ok());
  EXPECT_EQ(Sampler("none")["expires_unix_ms"].get<int64_t>(), 0);
  ASSERT_TRUE(Export("minute", "", 60).ok());
  const nlohmann::json minute = Sampler("minute");
  EXPECT_EQ(minute["expires_unix_ms"].get<int64_t>(), minute["created_unix_ms"].get<int64_t>() + 60000);
  for (int64_t ttl : {std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::max() / 1000}) {
    const std::string name = "huge" + std::to_string(ttl);
    ASSERT_TRUE(Export(name, "", ttl).ok());
    EXPECT_EQ(Sampler(name)["expires_unix_ms"].get<int64_t>(), std::numeric_limits<int64_t>::max()) << ttl;
  }
}

TEST_F(PeftExportTest, AMissingBaseTensorIsNamedAndLeavesNothing) {
  // The base model without one attention weight the adapter adapts.
  const std::string base = root_ + "/base";
  fs::create_directories(base);
  auto file = SafetensorsFile::Open(Model() + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<TensorToWrite> kept;
  for (const std::string& name : (*file)->names()) {
    if (name == "model.layers.1.self_attn.o_proj.weight") continue;
    const TensorView v = *(*file)->Get(name);
    kept.push_back({name, v.dtype, v.shape, v.data, v.nbytes});
  }
  ASSERT_TRUE(WriteSafetensors(base + "/model.safetensors", kept).ok());
  fs::copy_file(Model() + "/config.json", base + "/config.json");

  const absl::Status s = Export("out", base);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("no tensor model.layers.1.self_attn.o_proj.weight"), std::string::npos) << s;
  EXPECT_EQ(s.message().find("fused"), std::string::npos) << s;
  EXPECT_EQ(Entries(), std::vector<std::string>{"base"});
}

// A safetensors file the model does not load from (a consolidated copy in
// another naming, as some repositories ship) is neither merged nor copied.
TEST_F(PeftExportTest, TheMergedModelHoldsOnlyTheFilesTheModelLoads) {
  const std::string base = root_ + "/base";
  fs::create_directories(base);
  for (const char* f : {"model.safetensors", "config.json"}) fs::copy_file(Model() + "/" + f, base + "/" + f);
  fs::copy_file(Model() + "/model.safetensors", base + "/consolidated.safetensors");
  ASSERT_TRUE(Export("out", base).ok());
  std::vector<std::string> merged;
  for (const auto& e : fs::directory_iterator(root_ + "/out/merged")) merged.push_back(e.path().filename().string());
  std::sort(merged.begin(), merged.end());
  EXPECT_EQ(merged, (std::vector<std::string>{"config.json", "model.safetensors"}));
}

// lathe's shards move in before the export appears; when the export fails
// they stay where they were.
TEST_F(PeftExportTest, ShardsMoveInWithTheExportOrStayPut) {
  const std::string shards = root_ + "/shards";
  fs::create_directories(shards);
  std::ofstream(shards + "/rank-0.safetensors") << "x";
  ASSERT_TRUE(WritePeftAdapter(params_, lora_, root_ + "/out", {"tiny", "", 0, shards}).ok());
  EXPECT_TRUE(fs::exists(root_ + "/out/lathe/rank-0.safetensors"));
  EXPECT_EQ(Entries(), std::vector<std::string>{"out"});
  fs::create_directories(shards);
  std::ofstream(shards + "/rank-0.safetensors") << "x";
  const absl::Status s = WritePeftAdapter(params_, lora_, root_ + "/bad", {"tiny", root_ + "/nowhere", 0, shards});
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(fs::exists(shards + "/rank-0.safetensors")) << s;
  EXPECT_EQ(Entries(), (std::vector<std::string>{"out", "shards"})) << s;
}

TEST_F(PeftExportTest, AWriteThatFailsMidwayLeavesNothing) {
  ASSERT_TRUE(Export("whole", Model()).ok());
  const auto adapter = fs::file_size(root_ + "/whole/adapter_model.safetensors");
  const auto merged = fs::file_size(root_ + "/whole/merged/model.safetensors");
  ASSERT_LT(adapter, merged);
  // The adapter file fails; then the adapter fits and the merged model fails.
  for (uintmax_t limit : {adapter / 2, (adapter + merged) / 2}) {
    absl::Status s;
    {
      FileSizeLimit cap(limit);
      s = Export("cut", Model());
    }
    EXPECT_FALSE(s.ok()) << "limit " << limit;
    EXPECT_EQ(Entries(), std::vector<std::string>{"whole"}) << "limit " << limit << ": " << s;
  }
}

}  // namespace
}  // namespace lathe::runtime
