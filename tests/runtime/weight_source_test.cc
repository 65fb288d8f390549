// Weight loading: BF16 / F16 / F32 checkpoints become fp32 tensors; missing
// tensors and wrong shapes are refused by name.
#include "runtime/weight_source.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>

namespace lathe::runtime {
namespace {

TEST(WeightSourceTest, ConvertsHalfPrecisionAndChecksShapes) {
  const std::string dir = ::testing::TempDir() + "/weight_source_test";
  std::filesystem::create_directories(dir);
  at::Tensor values = at::tensor({1.5f, -2.25f, 0.0078125f, 3072.0f}, at::kFloat).view({2, 2});
  at::Tensor bf16 = values.to(at::kBFloat16).contiguous();
  at::Tensor f16 = values.to(at::kHalf).contiguous();
  std::vector<TensorToWrite> tensors = {
      {"a.bf16", "BF16", {2, 2}, bf16.data_ptr(), static_cast<size_t>(bf16.nbytes())},
      {"a.f16", "F16", {2, 2}, f16.data_ptr(), static_cast<size_t>(f16.nbytes())},
      {"a.f32", "F32", {2, 2}, values.data_ptr(), static_cast<size_t>(values.nbytes())},
  };
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors).ok());
  auto source = WeightSource::Open(dir);
  ASSERT_TRUE(source.ok()) << source.status();
  for (const char* name : {"a.bf16", "a.f16", "a.f32"}) {
    auto t = source->Take(name, {2, 2});
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(*t, values)) << name;  // all four values are exact in 16 bits
  }
  auto shape = source->Take("a.f32", {4});
  EXPECT_EQ(shape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(shape.status().message().find("a.f32"), std::string::npos);
  auto missing = source->Take("b", {2});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(missing.status().message().find("'b'"), std::string::npos);
}

// A rank of a sharded model reads slices: rows, columns, and a range of
// experts from per-expert or fused checkpoints.
TEST(WeightSourceTest, ReadsSlicesAndExpertRanges) {
  const std::string dir = ::testing::TempDir() + "/weight_source_slices";
  std::filesystem::create_directories(dir);
  at::Tensor w = at::arange(5 * 6, at::kFloat).view({5, 6}).to(at::kBFloat16).contiguous();
  // Four experts, inter 2, hidden 3, stored per expert and fused.
  at::Tensor gate_up = at::arange(4 * 4 * 3, at::kFloat).view({4, 4, 3}).contiguous();
  at::Tensor down = at::arange(4 * 3 * 2, at::kFloat).view({4, 3, 2}).neg().contiguous();
  std::vector<at::Tensor> keep;
  std::vector<TensorToWrite> per_expert = {{"w", "BF16", {5, 6}, w.data_ptr(), static_cast<size_t>(w.nbytes())}};
  for (int e = 0; e < 4; ++e) {
    for (auto [name, t] : {std::pair{"gate_proj", gate_up[e].narrow(0, 0, 2)}, {"up_proj", gate_up[e].narrow(0, 2, 2)},
                           {"down_proj", down[e]}}) {
      keep.push_back(t.contiguous());
      per_expert.push_back({"mlp.experts." + std::to_string(e) + "." + name + ".weight", "F32",
                            keep.back().sizes().vec(), keep.back().data_ptr(), static_cast<size_t>(keep.back().nbytes())});
    }
  }
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", per_expert).ok());
  const std::string fused_dir = dir + "/fused";
  std::filesystem::create_directories(fused_dir);
  ASSERT_TRUE(WriteSafetensors(fused_dir + "/model.safetensors",
                               {{"mlp.experts.gate_up_proj", "F32", {4, 4, 3}, gate_up.data_ptr(),
                                 static_cast<size_t>(gate_up.nbytes())},
                                {"mlp.experts.down_proj", "F32", {4, 3, 2}, down.data_ptr(),
                                 static_cast<size_t>(down.nbytes())}}).ok());
  auto source = WeightSource::Open(dir);
  ASSERT_TRUE(source.ok()) << source.status();
  at::Tensor full = w.to(at::kFloat);
  auto rows = source->Take("w", {5, 6}, {0, 1, 3});
  ASSERT_TRUE(rows.ok());
  EXPECT_TRUE(at::equal(*rows, full.narrow(0, 1, 3)));
  auto cols = source->Take("w", {5, 6}, {1, 4, 2});
  ASSERT_TRUE(cols.ok());
  EXPECT_TRUE(cols->is_contiguous());
  EXPECT_TRUE(at::equal(*cols, full.narrow(1, 4, 2)));
  auto fused = WeightSource::Open(fused_dir);
  ASSERT_TRUE(fused.ok()) << fused.status();
  for (const WeightSource* src : {&*source, &*fused}) {
    auto experts = src->TakeExperts("mlp", 4, 2, 3, 1, 2);
    ASSERT_TRUE(experts.ok()) << experts.status();
    EXPECT_TRUE(at::equal(experts->gate, gate_up.narrow(0, 1, 2).narrow(1, 0, 2)));
    EXPECT_TRUE(at::equal(experts->up, gate_up.narrow(0, 1, 2).narrow(1, 2, 2)));
    EXPECT_TRUE(at::equal(experts->down, down.narrow(0, 1, 2)));
  }
}

}  // namespace
}  // namespace lathe::runtime
