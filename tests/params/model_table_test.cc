// Parameter tables of real configs against transformers' counts, and the
// per-rank cuts the runtime and the plan share.
#include "params/model_table.h"

#include <gtest/gtest.h>

#include "nlohmann/json.hpp"

namespace lathe::params {
namespace {

using nlohmann::json;

// DeepSeek-V3's text config at Kimi-K2's sizes (seed: shared/reference).
json KimiText() {
  return {{"model_type", "kimi_k2"}, {"hidden_size", 7168}, {"intermediate_size", 18432},
          {"moe_intermediate_size", 2048}, {"num_hidden_layers", 61}, {"first_k_dense_replace", 1},
          {"num_attention_heads", 64}, {"num_key_value_heads", 64}, {"q_lora_rank", 1536}, {"kv_lora_rank", 512},
          {"qk_nope_head_dim", 128}, {"qk_rope_head_dim", 64}, {"v_head_dim", 128}, {"n_routed_experts", 384},
          {"num_experts_per_tok", 8}, {"n_shared_experts", 1}, {"n_group", 1}, {"topk_group", 1},
          {"vocab_size", 163840}, {"tie_word_embeddings", false}};
}

RankCount Whole(const json& config) {
  auto c = runtime::ParseModelConfig(config.dump());
  EXPECT_TRUE(c.ok()) << c.status();
  auto table = DescribeModel(*c);
  EXPECT_TRUE(table.ok()) << table.status();
  return CountRank(*table, RankPlace{}, 0);
}

// transformers 5.23 on the meta device: sum(p.numel()) of DeepseekV3ForCausalLM
// at these sizes; the routers' e_score_correction_bias is a buffer there
// (61 - first_k_dense_replace layers x experts), held fp32 and frozen here.
TEST(ModelTableTest, KimiK2ParametersAreTransformersCount) {
  const RankCount n = Whole({{"architectures", {"KimiK25ForConditionalGeneration"}},
                             {"tie_word_embeddings", false}, {"text_config", KimiText()}});
  EXPECT_DOUBLE_EQ(n.weights, 1026408209408.0);
  EXPECT_DOUBLE_EQ(n.frozen_fp32, 60.0 * 384);
}

TEST(ModelTableTest, DeepseekV3ParametersAreTransformersCount) {
  json text = KimiText();
  text.erase("model_type");
  text["architectures"] = {"DeepseekV3ForCausalLM"};
  text["num_attention_heads"] = text["num_key_value_heads"] = 128;
  text["n_routed_experts"] = 256;
  text["n_group"] = 8;
  text["topk_group"] = 4;
  text["first_k_dense_replace"] = 3;
  text["vocab_size"] = 129280;
  const RankCount n = Whole(text);
  EXPECT_DOUBLE_EQ(n.weights, 671026404352.0);  // DeepSeek's "671B" (685B with the MTP layer)
  EXPECT_DOUBLE_EQ(n.frozen_fp32, 58.0 * 256);
}

// GLM-5.2 (transformers 5.23, meta device): 743.4B parameters, of which the
// 21 "full" layers' indexers (never trained) hold 196.8M; 75 MoE layers'
// correction biases are fp32 buffers.
TEST(ModelTableTest, Glm52ParametersAreTransformersCount) {
  const json config = {{"architectures", {"GlmMoeDsaForCausalLM"}},
                       {"hidden_size", 6144},
                       {"intermediate_size", 12288},
                       {"moe_intermediate_size", 2048},
                       {"num_hidden_layers", 78},
                       {"num_attention_heads", 64},
                       {"num_key_value_heads", 64},
                       {"q_lora_rank", 2048},
                       {"kv_lora_rank", 512},
                       {"qk_nope_head_dim", 192},
                       {"qk_rope_head_dim", 64},
                       {"v_head_dim", 256},
                       {"n_routed_experts", 256},
                       {"num_experts_per_tok", 8},
                       {"n_shared_experts", 1},
                       {"n_group", 1},
                       {"topk_group", 1},
                       {"first_k_dense_replace", 3},
                       {"index_topk", 2048},
                       {"index_head_dim", 128},
                       {"index_n_heads", 32},
                       {"index_topk_freq", 4},
                       {"index_skip_topk_offset", 3},
                       {"vocab_size", 154880},
                       {"tie_word_embeddings", false}};
  const RankCount n = Whole(config);
  EXPECT_DOUBLE_EQ(n.weights + n.frozen, 743377000704.0);
  EXPECT_DOUBLE_EQ(n.frozen, 196809984.0);
  EXPECT_DOUBLE_EQ(n.frozen_fp32, 75.0 * 256);
}

TEST(ModelTableTest, CutsPerRank) {
  // Two KV heads of 16 over tp 4: each pair of ranks shares one head.
  EXPECT_EQ(CutRange(Cut::kKvRows, 32, 16, {4, 3}), (std::pair<int64_t, int64_t>{16, 16}));
  EXPECT_EQ(CutRange(Cut::kKvRows, 64, 16, {2, 1}), (std::pair<int64_t, int64_t>{32, 32}));
  // Balanced vocabulary rows: 10 over 4 ranks are 2, 3, 2, 3.
  EXPECT_EQ(CutRange(Cut::kVocab, 10, 1, {4, 1}), (std::pair<int64_t, int64_t>{2, 3}));
  EXPECT_EQ(CutRange(Cut::kExperts, 8, 1, {1, 0, 4, 3}), (std::pair<int64_t, int64_t>{6, 2}));
  // The fused in_proj_qkv: q, k, v blocks each cut; whole under full fine-tuning.
  TensorRow qkv{"in_proj_qkv", "x", {64, 8}, Cut::kPartRows, 1, {16, 16, 32}, {"q", "k", "v"}, true};
  RankPart part = PartOf(qkv, {2, 1});
  EXPECT_EQ(part.dim, 0);
  EXPECT_EQ(part.ranges, (std::vector<std::pair<int64_t, int64_t>>{{8, 8}, {24, 8}, {48, 16}}));
  EXPECT_EQ(RankNumel(qkv, {2, 1}), 32 * 8);
  EXPECT_EQ(RankNumel(qkv, {2, 1, 1, 0, true}), 64 * 8);
  // Adapters: a rows-cut layer keeps A whole and cuts B; a cols-cut one the reverse.
  EXPECT_EQ(RankAdapterNumel({"q", 64, 32, Cut::kRows}, 4, {2, 0}), 4 * (32 + 32));
  EXPECT_EQ(RankAdapterNumel({"o", 32, 64, Cut::kCols}, 4, {2, 0}), 4 * (32 + 32));
  EXPECT_EQ(RankAdapterNumel({"e", 16, 8, Cut::kExperts, 1, 8}, 4, {1, 0, 2, 1}), 4 * 4 * (16 + 8));
}

TEST(ModelTableTest, UndescribedArchitectureIsNamed) {
  runtime::ModelConfig c;
  c.architecture = "NemotronHForCausalLM";
  auto table = DescribeModel(c);
  ASSERT_EQ(table.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(table.status().message().find("NemotronHForCausalLM"), std::string::npos);
}

}  // namespace
}  // namespace lathe::params
