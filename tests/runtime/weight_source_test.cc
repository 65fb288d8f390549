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

}  // namespace
}  // namespace lathe::runtime
