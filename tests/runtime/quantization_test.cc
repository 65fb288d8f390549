// Quantized checkpoints: the quantization_config reader, the fp8 e4m3 decoding, and the
// block-FP8 / pack-quantized dequantizers on partial edge blocks, regions cut through
// blocks and groups, and their refusals of inconsistent tensors.
#include "core/quantization.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace lathe::runtime {
namespace {

TensorView View(const std::string& name, const std::string& dtype, std::vector<int64_t> shape, const void* data) {
  TensorView v;
  v.name = name;
  v.dtype = dtype;
  v.shape = std::move(shape);
  v.data = static_cast<const uint8_t*>(data);
  return v;
}

uint16_t Bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>(bits >> 16);  // exact for the values used here
}

TEST(Fp8E4m3Test, DecodesNormalsSubnormalsSignAndNan) {
  EXPECT_EQ(Fp8E4m3ToFloat(0x00), 0.0f);
  EXPECT_EQ(Fp8E4m3ToFloat(0x38), 1.0f);
  EXPECT_EQ(Fp8E4m3ToFloat(0xb8), -1.0f);
  EXPECT_EQ(Fp8E4m3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(Fp8E4m3ToFloat(0x3c), 1.5f);
  EXPECT_EQ(Fp8E4m3ToFloat(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(Fp8E4m3ToFloat(0x08), std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(Fp8E4m3ToFloat(0x7f)));
  EXPECT_TRUE(std::isnan(Fp8E4m3ToFloat(0xff)));
}

// A 5 x 7 weight in 2 x 3 blocks: a 3 x 3 scale grid whose last row and column are partial.
struct Fp8Fixture {
  std::vector<uint8_t> q = std::vector<uint8_t>(2 * 5 * 7);
  std::vector<float> scale = std::vector<float>(2 * 3 * 3);
  Fp8Fixture() {
    for (size_t i = 0; i < q.size(); ++i) q[i] = i % 3 == 0 ? 0x38 : (i % 3 == 1 ? 0x3c : 0xc0);  // 1, 1.5, -2
    for (size_t i = 0; i < scale.size(); ++i) scale[i] = 0.25f * static_cast<float>(i + 1);
  }
  float Want(int64_t l, int64_t r, int64_t c) const {
    return Fp8E4m3ToFloat(q[(l * 5 + r) * 7 + c]) * scale[(l * 3 + r / 2) * 3 + c / 3];
  }
};

TEST(DequantizeFp8BlockTest, PartialEdgeBlocksAndRegionsCutThroughBlocks) {
  Fp8Fixture f;
  const TensorView w = View("w.weight", "F8_E4M3", {2, 5, 7}, f.q.data());
  const TensorView s = View("w.weight_scale_inv", "F32", {2, 3, 3}, f.scale.data());
  for (Region r : {Region{0, 2, 0, 5, 0, 7}, Region{1, 1, 1, 3, 2, 4}, Region{0, 2, 4, 1, 5, 2}}) {
    std::vector<float> out(r.numel());
    ASSERT_TRUE(DequantizeFp8Block(w, s, 2, 3, r, out.data()).ok());
    size_t i = 0;
    for (int64_t l = r.lead_begin; l < r.lead_begin + r.lead; ++l)
      for (int64_t row = r.row_begin; row < r.row_begin + r.rows; ++row)
        for (int64_t c = r.col_begin; c < r.col_begin + r.cols; ++c) EXPECT_EQ(out[i++], f.Want(l, row, c));
  }
}

TEST(DequantizeFp8BlockTest, ReadsBf16AndUe8m0Scales) {
  const uint8_t q[4] = {0x38, 0x3c, 0xc0, 0x38};
  const uint16_t bf16[1] = {Bf16(0.75f)};
  const uint8_t e8m0[1] = {130};  // 2^3
  std::vector<float> out(4);
  ASSERT_TRUE(DequantizeFp8Block(View("w", "F8_E4M3", {2, 2}, q), View("s", "BF16", {1, 1}, bf16), 128, 128,
                                 Region{0, 1, 0, 2, 0, 2}, out.data()).ok());
  EXPECT_EQ(out, (std::vector<float>{0.75f, 1.125f, -1.5f, 0.75f}));
  ASSERT_TRUE(DequantizeFp8Block(View("w", "F8_E4M3", {2, 2}, q), View("s", "F8_E8M0", {1, 1}, e8m0), 128, 128,
                                 Region{0, 1, 0, 2, 0, 2}, out.data()).ok());
  EXPECT_EQ(out, (std::vector<float>{8.0f, 12.0f, -16.0f, 8.0f}));
}

TEST(DequantizeFp8BlockTest, RefusesInconsistentTensorsNamingThem) {
  Fp8Fixture f;
  std::vector<float> out(35);
  const Region all{0, 1, 0, 5, 0, 7};
  const TensorView w = View("layer.weight", "F8_E4M3", {5, 7}, f.q.data());
  absl::Status shape = DequantizeFp8Block(w, View("layer.weight_scale_inv", "F32", {2, 3}, f.scale.data()), 2, 3,
                                          all, out.data());
  EXPECT_EQ(shape.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(shape.message().find("'layer.weight'"), std::string::npos) << shape;
  EXPECT_NE(shape.message().find("[2, 3]"), std::string::npos) << shape;
  EXPECT_NE(shape.message().find("[3, 3]"), std::string::npos) << shape;
  absl::Status dtype = DequantizeFp8Block(w, View("s", "I32", {3, 3}, f.scale.data()), 2, 3, all, out.data());
  EXPECT_EQ(dtype.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(dtype.message().find("I32"), std::string::npos) << dtype;
  absl::Status weight = DequantizeFp8Block(View("layer.weight", "BF16", {5, 7}, f.q.data()),
                                           View("s", "F32", {3, 3}, f.scale.data()), 2, 3, all, out.data());
  EXPECT_EQ(weight.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(weight.message().find("'layer.weight'"), std::string::npos) << weight;
}

// A [2, 20] int4 weight in groups of 10: 20 nibbles take 3 words, the last half padding.
struct PackedFixture {
  int Q(int r, int c) const { return (r * 20 + c * 7) % 16 - 8; }
  std::vector<int32_t> words = std::vector<int32_t>(2 * 3, 0);
  uint16_t scale[4] = {Bf16(0.5f), Bf16(2.0f), Bf16(-0.125f), Bf16(3.0f)};
  PackedFixture() {
    for (int r = 0; r < 2; ++r)
      for (int c = 0; c < 20; ++c) {
        const uint32_t u = static_cast<uint32_t>(Q(r, c) + 8);
        uint32_t& w = reinterpret_cast<uint32_t&>(words[r * 3 + c / 8]);
        w |= u << (4 * (c % 8));
      }
  }
  float Want(int r, int c) const {
    const float s[4] = {0.5f, 2.0f, -0.125f, 3.0f};
    return static_cast<float>(Q(r, c)) * s[r * 2 + c / 10];
  }
};

TEST(DequantizePackedTest, UnpacksLowNibbleFirstAndCutsGroups) {
  PackedFixture f;
  const TensorView p = View("e.weight_packed", "I32", {2, 3}, f.words.data());
  const TensorView s = View("e.weight_scale", "BF16", {2, 2}, f.scale);
  for (Region r : {Region{0, 1, 0, 2, 0, 20}, Region{0, 1, 1, 1, 3, 14}, Region{0, 1, 0, 2, 9, 2}}) {
    std::vector<float> out(r.numel());
    ASSERT_TRUE(DequantizePacked(p, s, {2, 20}, 4, 10, r, out.data()).ok());
    size_t i = 0;
    for (int64_t row = r.row_begin; row < r.row_begin + r.rows; ++row)
      for (int64_t c = r.col_begin; c < r.col_begin + r.cols; ++c) EXPECT_EQ(out[i++], f.Want(row, c)) << row << "," << c;
  }
}

TEST(DequantizePackedTest, RefusesShapesThatDoNotMatch) {
  PackedFixture f;
  std::vector<float> out(40);
  const Region all{0, 1, 0, 2, 0, 20};
  const TensorView s = View("e.weight_scale", "BF16", {2, 2}, f.scale);
  absl::Status packed = DequantizePacked(View("e.weight_packed", "I32", {2, 3}, f.words.data()), s, {2, 28}, 4, 10,
                                         all, out.data());
  EXPECT_EQ(packed.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(packed.message().find("'e.weight_packed'"), std::string::npos) << packed;
  absl::Status group = DequantizePacked(View("e.weight_packed", "I32", {2, 3}, f.words.data()), s, {2, 20}, 4, 5,
                                        all, out.data());
  EXPECT_EQ(group.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(group.message().find("groups of 5"), std::string::npos) << group;
  absl::Status dtype = DequantizePacked(View("e.weight_packed", "I64", {2, 3}, f.words.data()), s, {2, 20}, 4, 10,
                                        all, out.data());
  EXPECT_EQ(dtype.code(), absl::StatusCode::kDataLoss);
}

TEST(QuantizationConfigTest, ReadsFp8AndCompressedTensors) {
  auto fp8 = ParseQuantizationConfig(R"({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"})");
  ASSERT_TRUE(fp8.ok()) << fp8.status();
  EXPECT_EQ(fp8->method, QuantMethod::kFp8Block);
  EXPECT_EQ(fp8->block_rows, 128);
  EXPECT_EQ(fp8->block_cols, 128);
  fp8 = ParseQuantizationConfig(
      R"({"quant_method": "fp8", "weight_block_size": [64, 32], "modules_to_not_convert": ["model.layers.1", "lm_head", "mlp.gate"]})");
  ASSERT_TRUE(fp8.ok()) << fp8.status();
  EXPECT_EQ(fp8->block_rows, 64);
  EXPECT_EQ(fp8->block_cols, 32);
  EXPECT_TRUE(fp8->NotConverted("model.layers.1.mlp.down_proj"));
  EXPECT_FALSE(fp8->NotConverted("model.layers.11.mlp.down_proj"));
  EXPECT_TRUE(fp8->NotConverted("lm_head"));
  EXPECT_TRUE(fp8->NotConverted("model.layers.0.mlp.gate"));
  EXPECT_FALSE(fp8->NotConverted("model.layers.0.mlp.gate_proj"));

  auto ct = ParseQuantizationConfig(R"({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": null,
        "weights": {"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group", "group_size": 32}}},
      "ignore": ["lm_head", "re:.*self_attn.*"]})");
  ASSERT_TRUE(ct.ok()) << ct.status();
  EXPECT_EQ(ct->method, QuantMethod::kPackQuantized);
  EXPECT_EQ(ct->bits, 4);
  EXPECT_EQ(ct->group_size, 32);
  EXPECT_TRUE(ct->NotConverted("lm_head"));
  EXPECT_FALSE(ct->NotConverted("language_model.lm_head"));  // exact names only
  EXPECT_TRUE(ct->NotConverted("model.layers.2.self_attn.q_proj"));
  EXPECT_FALSE(ct->NotConverted("model.layers.2.mlp.experts.0.up_proj"));
  QuantizationConfig uncompiled = *ct;  // as a caller may build one: patterns compiled per call
  uncompiled.patterns = nullptr;
  EXPECT_TRUE(uncompiled.NotConverted("model.layers.2.self_attn.q_proj"));
  EXPECT_FALSE(uncompiled.NotConverted("model.layers.2.mlp.experts.0.up_proj"));
}

TEST(QuantizationConfigTest, RefusesWhatItCannotReadNamingTheField) {
  const std::pair<const char*, const char*> cases[] = {
      {R"({"quant_method": "gptq", "bits": 4})", "quantization_config.quant_method"},
      {R"({"bits": 4})", "quantization_config.quant_method"},
      {R"({"quant_method": "fp8", "fmt": "e5m2"})", "quantization_config.fmt"},
      {R"({"quant_method": "fp8", "weight_block_size": [128]})", "quantization_config.weight_block_size"},
      {R"({"quant_method": "fp8", "weight_block_size": [0, 128]})", "quantization_config.weight_block_size"},
      {R"({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}})",
       "quantization_config.format"},
      {R"({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights":
          {"num_bits": 4, "type": "int", "symmetric": false, "strategy": "group", "group_size": 32}}}})",
       "weights.symmetric"},
      {R"({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights":
          {"num_bits": 3, "type": "int", "symmetric": true, "strategy": "group", "group_size": 32}}}})",
       "weights.num_bits"},
      {R"({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights":
          {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32}}}})",
       "weights.type"},
      // Values of the wrong JSON type are refused, not thrown.
      {R"({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights":
          {"num_bits": "4", "type": "int", "strategy": "group", "group_size": 32}}}})",
       "weights.num_bits"},
      {R"({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights":
          {"num_bits": 4, "type": "int", "symmetric": "yes", "strategy": "group", "group_size": 32}}}})",
       "weights.symmetric"},
      {R"({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights":
          {"num_bits": 4, "type": null, "strategy": "group", "group_size": 32}}}})",
       "weights.type"},
      {R"({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights":
          {"num_bits": 4, "type": "int", "strategy": 7}}}})",
       "weights.strategy"},
      {R"({"quant_method": "fp8", "modules_to_not_convert": ["layers.(1"]})",
       "quantization_config.modules_to_not_convert"},
      {R"({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights":
          {"num_bits": 4, "type": "int", "strategy": "channel"}}}, "ignore": ["re:[a-"]})",
       "quantization_config.ignore"},
  };
  for (const auto& [text, field] : cases) {
    auto c = ParseQuantizationConfig(text);
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_NE(c.status().message().find(field), std::string::npos) << c.status();
  }
}

std::string KimiConfig(const std::string& top, const std::string& text) {
  return absl::StrCat(R"({"architectures": ["KimiK25ForConditionalGeneration"], )", top.empty() ? "" : top + ", ",
                      R"("text_config": {"model_type": "kimi_k2")", text.empty() ? "" : ", " + text, "}}");
}

std::string Int4(int64_t group, const std::string& ignore = R"(["language_model.lm_head", "re:.*self_attn.*"])") {
  return absl::StrCat(R"("quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int", "symmetric": true,
        "strategy": "group", "group_size": )", group, R"(}}}, "ignore": )", ignore, "}");
}

TEST(CheckpointQuantizationTest, ReadsTheWrappersTextConfigTopLevelOrBoth) {
  for (const auto& [top, text] : std::vector<std::pair<std::string, std::string>>{
           {"", Int4(32)}, {Int4(32), ""}, {Int4(32), Int4(32)}}) {
    auto c = ReadCheckpointQuantization(KimiConfig(top, text));
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->method, QuantMethod::kPackQuantized);
    EXPECT_EQ(c->group_size, 32);
    EXPECT_EQ(c->text_prefix, "language_model.");
    // ignore entries match the wrapper's names, and the text model's names under it
    EXPECT_TRUE(c->NotConverted("language_model.lm_head"));
    EXPECT_TRUE(c->NotConverted("language_model.model.layers.0.self_attn.q_a_proj"));
    EXPECT_FALSE(c->NotConverted("language_model.model.layers.1.mlp.experts.0.up_proj"));
  }
  auto relative =
      ReadCheckpointQuantization(KimiConfig("", Int4(32, R"(["lm_head", "model.layers.1.mlp.experts.0.up_proj"])")));
  ASSERT_TRUE(relative.ok()) << relative.status();
  EXPECT_TRUE(relative->NotConverted("language_model.lm_head"));
  EXPECT_TRUE(relative->NotConverted("language_model.model.layers.1.mlp.experts.0.up_proj"));
  EXPECT_FALSE(relative->NotConverted("language_model.model.layers.1.mlp.experts.1.up_proj"));
  EXPECT_FALSE(relative->NotConverted("vision_tower.lm_head"));
  auto none = ReadCheckpointQuantization(KimiConfig("", ""));
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->method, QuantMethod::kNone);
  // A text model's own config has no prefix to leave out.
  auto plain =
      ReadCheckpointQuantization(absl::StrCat(R"({"architectures": ["DeepseekV3ForCausalLM"], )", Int4(32), "}"));
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->text_prefix, "");
}

TEST(CheckpointQuantizationTest, RefusesContradictionsAndBadTextConfigFieldsByName) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {KimiConfig(Int4(32), Int4(64)), "text_config.quantization_config.weights.group_size"},
      {KimiConfig(Int4(32), Int4(32, R"(["lm_head"])")), "text_config.quantization_config.ignore"},
      {KimiConfig(Int4(32), R"("quantization_config": {"quant_method": "fp8"})"),
       "text_config.quantization_config.quant_method"},
      {KimiConfig("", R"("quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 3, "type": "int", "strategy": "channel"}}}})"),
       "text_config.quantization_config.config_groups.g.weights.num_bits"},
      {KimiConfig("", R"("quantization_config": "int4")"), "text_config.quantization_config'"},
  };
  for (const auto& [text, field] : cases) {
    auto c = ReadCheckpointQuantization(text);
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_NE(c.status().message().find(field), std::string::npos) << c.status();
  }
}

}  // namespace
}  // namespace lathe::runtime
