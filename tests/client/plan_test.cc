// The memory estimate of `lathe plan` against sums worked out by hand from
// the formulas in docs/launching.md.
#include "client/plan.h"

#include <gtest/gtest.h>

#include <algorithm>

#include "presets/preset_table.h"

namespace lathe::client {
namespace {

presets::ModelFacts Dense() {
  presets::ModelFacts f;
  f.hidden_size = 64;
  f.num_hidden_layers = 2;
  f.num_attention_heads = 4;
  f.num_key_value_heads = 2;
  f.head_dim = 16;
  f.intermediate_size = 128;
  f.vocab_size = 1000;
  return f;
}

parallel::MeshShape Shape(int tp, int ep) { return {1, 1, 4, tp, ep}; }

TEST(PlanTest, DenseModelOverTp2ByHand) {
  auto m = EstimateMemory(Dense(), Shape(2, 1), 100, 8);
  ASSERT_TRUE(m.ok()) << m.status();
  // Per rank: q/o 32 wide, one KV head (16), MLP 64, vocabulary 500.
  // embed + lm_head 2*500*64 = 64000; attention 2*(2*64*32 + 2*64*16 + 4*64) = 12800; MLP 2*3*64*64 = 24576.
  // fp32, as the runtime holds them.
  EXPECT_DOUBLE_EQ(m->weights, 4.0 * (64000 + 12800 + 24576));
  // LoRA r=8: attention 2*8*((64+32) + 2*(64+16) + (32+64)) = 5632; MLP 2*8*3*(64+64) = 6144;
  // lm_head 8*(64+500) = 4512; value, gradient, m and v: 16 B each.
  EXPECT_DOUBLE_EQ(m->trainable_state, 16.0 * (5632 + 6144 + 4512));
  // 100 tokens: no recompute. Per token: 2 layers * (attention 288 + MLP 384) + final norm
  // 64 = 1408 fp32 elements, times the measured 1.7 for what autograd keeps beside them;
  // one logprob chunk of all 100 tokens: 2.25 [100, 500] buffers.
  EXPECT_DOUBLE_EQ(m->activations, 1.7 * 4.0 * 100 * 1408 + 2.25 * 4.0 * 100 * 500);
  EXPECT_DOUBLE_EQ(m->total(), m->weights + m->trainable_state + m->activations);
}

TEST(PlanTest, LongSequencesAreRecomputedLayerByLayerByHand) {
  auto m = EstimateMemory(Dense(), Shape(2, 1), 4096, 8);
  ASSERT_TRUE(m.ok()) << m.status();
  // Over 2048 tokens the runtime recomputes each layer: kept are the 2 layer inputs and
  // 3 more [T, 64] buffers; then one layer's backward (1.7 x 672 elements per token) or
  // one logprob chunk (4096 rows: 2.25 x [4096, 500]), whichever is larger.
  EXPECT_DOUBLE_EQ(m->activations, 4.0 * 4096 * 64 * (2 + 3) + std::max(1.7 * 4.0 * 4096 * 672,
                                                                          2.25 * 4.0 * 4096 * 500));
  // Linear in T from there: doubling the tokens doubles the activations.
  auto twice = EstimateMemory(Dense(), Shape(2, 1), 8192, 8);
  EXPECT_DOUBLE_EQ(twice->activations, 2 * m->activations);
}

TEST(PlanTest, FullFineTuningKeepsGradientAndMomentsBesideTheFp32Weights) {
  auto full = EstimateMemory(Dense(), Shape(2, 1), 100, 0);
  ASSERT_TRUE(full.ok());
  // 4 B weight (trained in place) + 4 B gradient + 8 B Adam m and v = 16 B per parameter.
  EXPECT_DOUBLE_EQ(full->weights + full->trainable_state, 4 * full->weights);
}

TEST(PlanTest, TiedEmbeddingsAndKvReplicationPastTheKvHeads) {
  presets::ModelFacts f = Dense();
  auto untied = EstimateMemory(f, Shape(4, 1), 10, 8);
  f.tie_word_embeddings = true;
  auto tied = EstimateMemory(f, Shape(4, 1), 10, 8);
  ASSERT_TRUE(untied.ok() && tied.ok());
  EXPECT_DOUBLE_EQ(untied->weights - tied->weights, 4.0 * 250 * 64);
  // tp 4 > 2 KV heads: each rank still holds a whole KV head (16 wide), as at tp 2.
  auto tp2 = EstimateMemory(Dense(), Shape(2, 1), 10, 8);
  // So going from tp 2 to tp 4 halves q, o, the MLP and the vocabulary slice, not k and v.
  const double q_tp4 = 4.0 * 2 * (2 * 64 * 16);
  const double q_tp2 = 4.0 * 2 * (2 * 64 * 32);
  EXPECT_DOUBLE_EQ(tp2->weights - untied->weights,
                   (q_tp2 - q_tp4) + 4.0 * 2 * 3 * 64 * (64 - 32) + 4.0 * 2 * (500 - 250) * 64);
}

TEST(PlanTest, ExpertsSplitOverEp) {
  presets::ModelFacts f = Dense();
  f.num_experts = 8;
  f.num_experts_per_tok = 2;
  f.moe_intermediate_size = 32;
  auto ep1 = EstimateMemory(f, Shape(1, 1), 10, 0);
  auto ep4 = EstimateMemory(f, Shape(1, 4), 10, 0);
  ASSERT_TRUE(ep1.ok() && ep4.ok());
  // Expert weights 2 layers * 8 experts * 3*64*32 fp32; ep 4 keeps a quarter.
  const double experts = 4.0 * 2 * 8 * 3 * 64 * 32;
  EXPECT_DOUBLE_EQ(ep1->weights - ep4->weights, experts * 3 / 4);
}

TEST(PlanTest, IncompleteFactsGiveNoEstimate) {
  presets::ModelFacts f = Dense();
  f.head_dim = 0;
  EXPECT_EQ(EstimateMemory(f, Shape(1, 1), 10, 8).status().code(), absl::StatusCode::kFailedPrecondition);
}

// Declared (unverified) rows are sized for a runtime with bf16 weights and
// activations and are not held to today's fp32 estimate.
TEST(PlanTest, EveryVerifiedPresetFitsWithLoraAtItsMaxSeqLen) {
  auto table = presets::LoadPresets(LATHE_PRESETS_FILE);
  ASSERT_TRUE(table.ok()) << table.status();
  for (const presets::Preset& p : *table) {
    if (!p.verified) continue;
    auto m = EstimateMemory(p.facts, {1, p.node_count, p.devices_per_node, p.tp, p.ep}, p.max_seq_len, 32);
    ASSERT_TRUE(m.ok()) << p.base_model;
    EXPECT_LT(m->total(), 0.9 * 80.0 * (1 << 30)) << p.base_model << " needs " << m->total() / (1 << 30) << " GiB";
  }
}

}  // namespace
}  // namespace lathe::client
