// Weight loading: BF16 / F16 / F32 checkpoints become fp32 tensors; missing
// tensors and wrong shapes are refused by name.
#include "runtime/weight_source.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <filesystem>
#include <fstream>

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

void WriteConfig(const std::string& dir, const std::string& quantization_config) {
  std::ofstream(dir + "/config.json") << R"({"architectures": ["Qwen3ForCausalLM"], "quantization_config": )"
                                      << quantization_config << "}";
}

// Every cut of a quantized weight dequantizes to the same values as the whole
// weight's slice, blocks and groups cut by the slice boundary included, and a
// bf16 run gets the fp32 values rounded once.
TEST(WeightSourceTest, QuantizedSlicesEqualTheWholeWeightsSlices) {
  const std::string dir = ::testing::TempDir() + "/weight_source_fp8";
  std::filesystem::create_directories(dir);
  at::Tensor q = at::randint(0, 0x7f, {2, 5, 7}, at::kByte);
  q.masked_fill_(q == 0x7f, 0x70);
  at::Tensor q2 = at::randint(0, 0x7f, {5, 7}, at::kByte);
  q2.masked_fill_(q2 == 0x7f, 0x70);
  at::Tensor scale = at::rand({2, 3, 3}, at::kFloat) + 0.1;
  at::Tensor scale2 = scale[0].contiguous();
  std::vector<TensorToWrite> tensors = {
      {"m.experts.gate_up_proj", "F8_E4M3", {2, 5, 7}, q.data_ptr(), 70},
      {"m.experts.gate_up_proj_scale_inv", "F32", {2, 3, 3}, scale.data_ptr(), 72},
      {"l.weight", "F8_E4M3", {5, 7}, q2.data_ptr(), 35},
      {"l.weight_scale_inv", "F32", {3, 3}, scale2.data_ptr(), 36},
  };
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors).ok());
  WriteConfig(dir, R"({"quant_method": "fp8", "weight_block_size": [2, 3]})");
  auto source = WeightSource::Open(dir);
  ASSERT_TRUE(source.ok()) << source.status();
  auto bf16 = WeightSource::Open(dir, at::kBFloat16);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  for (auto [name, shape] : {std::pair{std::string("m.experts.gate_up_proj"), std::vector<int64_t>{2, 5, 7}},
                             std::pair{std::string("l.weight"), std::vector<int64_t>{5, 7}}}) {
    auto whole = source->Take(name, shape);
    ASSERT_TRUE(whole.ok()) << whole.status();
    EXPECT_NE(whole->abs().sum().item<float>(), 0.0f);
    for (int dim = 0; dim < static_cast<int>(shape.size()); ++dim) {
      for (int64_t begin = 0; begin + 1 < shape[dim]; ++begin) {
        const Slice cut{dim, begin, std::min<int64_t>(3, shape[dim] - begin)};
        auto part = source->Take(name, shape, cut);
        ASSERT_TRUE(part.ok()) << part.status();
        EXPECT_TRUE(at::equal(*part, whole->narrow(dim, cut.begin, cut.size))) << name << " " << dim << " " << begin;
      }
    }
    auto half = bf16->Take(name, shape);
    ASSERT_TRUE(half.ok()) << half.status();
    EXPECT_TRUE(at::equal(*half, whole->to(at::kBFloat16)));
  }
}

// A weight over the 1 Mi-element chunk a bf16 run dequantizes through: the
// chunks join into the fp32 values rounded once.
TEST(WeightSourceTest, LargeQuantizedWeightRoundsChunkByChunkToTheSameBf16) {
  const std::string dir = ::testing::TempDir() + "/weight_source_fp8_large";
  std::filesystem::create_directories(dir);
  at::Tensor q = at::randint(0, 0x7f, {1030, 1100}, at::kByte);
  at::Tensor scale = at::rand({9, 9}, at::kFloat) + 0.1;
  std::vector<TensorToWrite> tensors = {
      {"big.weight", "F8_E4M3", {1030, 1100}, q.data_ptr(), 1030 * 1100},
      {"big.weight_scale_inv", "F32", {9, 9}, scale.data_ptr(), 9 * 9 * 4},
  };
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors).ok());
  WriteConfig(dir, R"({"quant_method": "fp8"})");
  auto fp32 = WeightSource::Open(dir);
  auto bf16 = WeightSource::Open(dir, at::kBFloat16);
  ASSERT_TRUE(fp32.ok() && bf16.ok());
  auto whole = fp32->Take("big.weight", {1030, 1100});
  ASSERT_TRUE(whole.ok()) << whole.status();
  for (const Slice cut : {Slice{}, Slice{0, 100, 930}, Slice{1, 64, 1000}}) {
    auto half = bf16->Take("big.weight", {1030, 1100}, cut);
    ASSERT_TRUE(half.ok()) << half.status();
    at::Tensor want = cut.dim < 0 ? *whole : whole->narrow(cut.dim, cut.begin, cut.size);
    EXPECT_TRUE(at::equal(*half, want.to(at::kBFloat16).contiguous()));
  }
}

TEST(WeightSourceTest, PackedInt4SlicesEqualTheWholeWeightsSlices) {
  const std::string dir = ::testing::TempDir() + "/weight_source_int4";
  std::filesystem::create_directories(dir);
  at::Tensor packed = at::randint(INT32_MIN, INT32_MAX, {4, 8}, at::kInt);
  at::Tensor scale = (at::rand({4, 2}, at::kFloat) + 0.1).to(at::kBFloat16);
  at::Tensor shape = at::tensor({4, 64}, at::kLong);
  std::vector<TensorToWrite> tensors = {
      {"p.weight_packed", "I32", {4, 8}, packed.data_ptr(), 128},
      {"p.weight_scale", "BF16", {4, 2}, scale.data_ptr(), 16},
      {"p.weight_shape", "I64", {2}, shape.data_ptr(), 16},
  };
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors).ok());
  WriteConfig(dir, R"({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups":
      {"group_0": {"weights": {"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
      "group_size": 32}}}, "ignore": ["q"]})");
  auto source = WeightSource::Open(dir);
  ASSERT_TRUE(source.ok()) << source.status();
  auto whole = source->Take("p.weight", {4, 64});
  ASSERT_TRUE(whole.ok()) << whole.status();
  // Word 0 of row 0, low nibble first, offset by 8, times the group's scale.
  const uint32_t w0 = static_cast<uint32_t>(packed[0][0].item<int32_t>());
  for (int i = 0; i < 8; ++i) {
    const float want = static_cast<float>(static_cast<int>((w0 >> (4 * i)) & 0xf) - 8) * scale[0][0].item<float>();
    EXPECT_EQ((*whole)[0][i].item<float>(), want) << i;
  }
  for (const Slice cut : {Slice{0, 1, 2}, Slice{1, 20, 24}, Slice{1, 33, 31}}) {
    auto part = source->Take("p.weight", {4, 64}, cut);
    ASSERT_TRUE(part.ok()) << part.status();
    EXPECT_TRUE(at::equal(*part, whole->narrow(cut.dim, cut.begin, cut.size)));
  }
  auto wrong = source->Take("p.weight", {4, 32});
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.status().message().find("'p.weight'"), std::string::npos) << wrong.status();
  EXPECT_FALSE(source->Take("p.weight_packed", {4, 8}).ok());  // never served as a weight
  EXPECT_EQ(source->Take("q.weight", {4, 64}).status().code(), absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace lathe::runtime
