// The memory estimate of `lathe plan` against sums worked out by hand from
// the formulas in docs/launching.md.
#include "client/plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "absl/strings/str_format.h"

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
  auto m = EstimateMemory(Dense(), Shape(2, 1), 100, 8, Dtype::kFloat32);
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
  auto m = EstimateMemory(Dense(), Shape(2, 1), 4096, 8, Dtype::kFloat32);
  ASSERT_TRUE(m.ok()) << m.status();
  // Over 2048 tokens the runtime recomputes each layer: kept are the 2 layer inputs and
  // 3 more [T, 64] buffers; then one layer's backward (1.7 x 672 elements per token) or
  // one logprob chunk (4096 rows: 2.25 x [4096, 500]), whichever is larger.
  EXPECT_DOUBLE_EQ(m->activations, 4.0 * 4096 * 64 * (2 + 3) + std::max(1.7 * 4.0 * 4096 * 672,
                                                                          2.25 * 4.0 * 4096 * 500));
  // Linear in T from there: doubling the tokens doubles the activations.
  auto twice = EstimateMemory(Dense(), Shape(2, 1), 8192, 8, Dtype::kFloat32);
  EXPECT_DOUBLE_EQ(twice->activations, 2 * m->activations);
}

TEST(PlanTest, FullFineTuningKeepsGradientAndMomentsBesideTheFp32Weights) {
  auto full = EstimateMemory(Dense(), Shape(2, 1), 100, 0, Dtype::kFloat32);
  ASSERT_TRUE(full.ok());
  // 4 B weight (trained in place) + 4 B gradient + 8 B Adam m and v = 16 B per parameter.
  EXPECT_DOUBLE_EQ(full->weights + full->trainable_state, 4 * full->weights);
}

TEST(PlanTest, TiedEmbeddingsAndKvReplicationPastTheKvHeads) {
  presets::ModelFacts f = Dense();
  auto untied = EstimateMemory(f, Shape(4, 1), 10, 8, Dtype::kFloat32);
  f.tie_word_embeddings = true;
  auto tied = EstimateMemory(f, Shape(4, 1), 10, 8, Dtype::kFloat32);
  ASSERT_TRUE(untied.ok() && tied.ok());
  EXPECT_DOUBLE_EQ(untied->weights - tied->weights, 4.0 * 250 * 64);
  // tp 4 > 2 KV heads: each rank still holds a whole KV head (16 wide), as at tp 2.
  auto tp2 = EstimateMemory(Dense(), Shape(2, 1), 10, 8, Dtype::kFloat32);
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
  auto ep1 = EstimateMemory(f, Shape(1, 1), 10, 0, Dtype::kFloat32);
  auto ep4 = EstimateMemory(f, Shape(1, 4), 10, 0, Dtype::kFloat32);
  ASSERT_TRUE(ep1.ok() && ep4.ok());
  // Expert weights 2 layers * 8 experts * 3*64*32 fp32; ep 4 keeps a quarter.
  const double experts = 4.0 * 2 * 8 * 3 * 64 * 32;
  EXPECT_DOUBLE_EQ(ep1->weights - ep4->weights, experts * 3 / 4);
}

TEST(PlanTest, IncompleteFactsGiveNoEstimate) {
  presets::ModelFacts f = Dense();
  f.head_dim = 0;
  EXPECT_EQ(EstimateMemory(f, Shape(1, 1), 10, 8, Dtype::kFloat32).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(PlanTest, Bfloat16HalvesWeightsAndActivationsAndKeepsFp32StateNormsAndLogprobsByHand) {
  auto m = EstimateMemory(Dense(), Shape(2, 1), 100, 8, Dtype::kBfloat16);
  ASSERT_TRUE(m.ok()) << m.status();
  // The same shard as DenseModelOverTp2ByHand, 2 B per base weight.
  EXPECT_DOUBLE_EQ(m->weights, 2.0 * (64000 + 12800 + 24576));
  // LoRA's adapter, gradient and Adam moments stay fp32: 16 B per adapter parameter.
  EXPECT_DOUBLE_EQ(m->trainable_state, 16.0 * (5632 + 6144 + 4512));
  // 1.7 x 2 B x the 1408 elements per token; fp32 per token: each layer's norms' inputs
  // (2 x 64) and q/k norms' (32 + 16) = 176, and its adapters' upcast inputs (q/k/v 64 +
  // o 32 + gate/up 64 + down 64) = 224: 400, twice, one layer's backward's input gradients
  // (224), the RoPE tables (2 x 16) and the final norm (64): 1120; the logprob chunk
  // stays fp32.
  EXPECT_DOUBLE_EQ(m->activations, 1.7 * 2.0 * 100 * 1408 + 4.0 * 100 * 1120 + 2.25 * 4.0 * 100 * 500);
  EXPECT_DOUBLE_EQ(m->gathered_kv, 0);
  // Recomputed: bf16 layer inputs and 3 more [T, 64] buffers, the fp32 RoPE tables, then
  // one layer's backward (bf16 elements and its 176 + 2 x 224 fp32 ones) or the fp32 chunk.
  auto long_seq = EstimateMemory(Dense(), Shape(2, 1), 4096, 8, Dtype::kBfloat16);
  ASSERT_TRUE(long_seq.ok());
  EXPECT_DOUBLE_EQ(long_seq->activations,
                   2.0 * 4096 * 64 * (2 + 3) + 4.0 * 4096 * 32 +
                       std::max(1.7 * 2.0 * 4096 * 672 + 4.0 * 4096 * 624, 2.25 * 4.0 * 4096 * 500));
}

TEST(PlanTest, Bfloat16FullFineTuningKeepsAnFp32MasterGradientAndMoments) {
  auto full = EstimateMemory(Dense(), Shape(2, 1), 100, 0, Dtype::kBfloat16);
  ASSERT_TRUE(full.ok());
  // bf16 working copy (2 B) + fp32 master, gradient, m and v (16 B) = 18 B per parameter.
  EXPECT_DOUBLE_EQ(full->trainable_state, 8 * full->weights);
}

parallel::MeshShape WithCp(int tp, int cp) { return {1, 1, 8, tp, 1, cp}; }

TEST(PlanTest, ContextParallelRanksHoldTheirShareOfTokensAndTheGatheredKvByHand) {
  // 8192 tokens over cp 2: each rank's activations are those of 4096 tokens (recomputed).
  auto cp2 = EstimateMemory(Dense(), WithCp(2, 2), 8192, 8, Dtype::kFloat32);
  auto half = EstimateMemory(Dense(), Shape(2, 1), 4096, 8, Dtype::kFloat32);
  ASSERT_TRUE(cp2.ok() && half.ok());
  EXPECT_DOUBLE_EQ(cp2->activations, half->activations);
  EXPECT_DOUBLE_EQ(cp2->weights, half->weights);
  // With recompute one layer's gathered K and V (8192 x 16 each at tp 2) and their
  // gradients live at a time.
  EXPECT_DOUBLE_EQ(cp2->gathered_kv, 2 * (2 * 4.0 * 8192 * 16));
  EXPECT_DOUBLE_EQ(cp2->total(), cp2->weights + cp2->trainable_state + cp2->activations + cp2->gathered_kv);
  // 2048 tokens over cp 2 (1024 per rank: no recompute): every layer's gathered K/V stay to
  // the backward, and one layer's gradients come on top: (2 + 1) layers' worth, in bf16.
  auto kept = EstimateMemory(Dense(), WithCp(2, 2), 2048, 8, Dtype::kBfloat16);
  auto own = EstimateMemory(Dense(), Shape(2, 1), 1024, 8, Dtype::kBfloat16);
  ASSERT_TRUE(kept.ok() && own.ok());
  EXPECT_DOUBLE_EQ(kept->activations, own->activations);
  EXPECT_DOUBLE_EQ(kept->gathered_kv, 3 * (2 * 2.0 * 2048 * 16));
  // A length cp does not divide: each rank holds ceil(T / cp) tokens.
  auto odd = EstimateMemory(Dense(), WithCp(2, 2), 4097, 8, Dtype::kFloat32);
  auto ceil = EstimateMemory(Dense(), Shape(2, 1), 2049, 8, Dtype::kFloat32);
  EXPECT_DOUBLE_EQ(odd->activations, ceil->activations);
}

TEST(PlanTest, DtypeNamesAreCheckedByName) {
  EXPECT_EQ(*ParseDtype("bfloat16"), Dtype::kBfloat16);
  EXPECT_EQ(*ParseDtype("float32"), Dtype::kFloat32);
  auto bad = ParseDtype("fp16");
  ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("fp16"), std::string::npos);
}

std::vector<presets::Preset> Shipped() {
  auto table = presets::LoadPresets(LATHE_PRESETS_FILE);
  EXPECT_TRUE(table.ok()) << table.status();
  return table.ok() ? *table : std::vector<presets::Preset>();
}

parallel::MeshShape ShapeOf(const presets::Preset& p) {
  return {1, p.node_count, p.devices_per_node, p.tp, p.ep, p.cp};
}

// The headline: Qwen3-8B at 131,072 tokens, LoRA rank 32, on 80 GB devices in bf16.
TEST(PlanTest, Qwen3_8BAt131072TokensFitsAnH100InBfloat16WithItsLayout) {
  std::vector<presets::Preset> table = Shipped();
  const presets::Preset* p = presets::FindPreset(table, "Qwen/Qwen3-8B");
  ASSERT_NE(p, nullptr);
  EXPECT_TRUE(p->verified);
  EXPECT_EQ(p->max_seq_len, 131072);
  auto bf16 = EstimateMemory(p->facts, ShapeOf(*p), p->max_seq_len, 32, Dtype::kBfloat16);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_TRUE(Fits(*bf16, kH100.gib)) << bf16->total() / (1 << 30) << " GiB";
  EXPECT_TRUE(Fits(*bf16, kH200.gib));
  // Its layout splits each sequence over 2 ranks: without that, tp 4 alone does not fit.
  EXPECT_EQ(p->cp, 2);
  parallel::MeshShape no_cp = ShapeOf(*p);
  no_cp.cp = 1;
  auto whole = EstimateMemory(p->facts, no_cp, p->max_seq_len, 32, Dtype::kBfloat16);
  ASSERT_TRUE(whole.ok());
  EXPECT_FALSE(Fits(*whole, kH100.gib)) << whole->total() / (1 << 30) << " GiB";
  // float32 (CPU ranks) takes more.
  auto fp32 = EstimateMemory(p->facts, ShapeOf(*p), p->max_seq_len, 32, Dtype::kFloat32);
  ASSERT_TRUE(fp32.ok());
  EXPECT_GT(fp32->total(), bf16->total() * 1.3);
}

// Every row whose facts allow an estimate, declared ones included, is sized for
// LoRA rank 32 at its max_seq_len on an H100 in bf16.
TEST(PlanTest, EveryPresetFitsAnH100WithLoraAtItsMaxSeqLenInBfloat16) {
  int estimated = 0;
  for (const presets::Preset& p : Shipped()) {
    if (!p.facts.Complete()) {
      EXPECT_FALSE(p.verified) << p.base_model;
      EXPECT_NE(p.note.find("no estimate"), std::string::npos) << p.base_model << ": say why in the note";
      continue;
    }
    auto m = EstimateMemory(p.facts, ShapeOf(p), p.max_seq_len, 32, Dtype::kBfloat16);
    ASSERT_TRUE(m.ok()) << p.base_model;
    EXPECT_TRUE(Fits(*m, kH100.gib)) << p.base_model << " needs " << m->total() / (1 << 30) << " GiB";
    ++estimated;
  }
  EXPECT_GE(estimated, 20);
}

int Plan(const std::vector<presets::Preset>& table, const std::string& model, Dtype dtype, double device_gib) {
  PlanOptions o;
  o.layout.model = model;
  o.dtype = dtype;
  o.device_memory_gib = device_gib;
  return PlanCommand(table, o);
}

TEST(PlanTest, ExitCodeThreeWhenTheTargetDeviceIsTooSmall) {
  std::vector<presets::Preset> table = Shipped();
  // Target: the H100 unless --device_memory_gib names another.
  EXPECT_EQ(Plan(table, "Qwen/Qwen3-8B", Dtype::kBfloat16, 0), 0);
  EXPECT_EQ(Plan(table, "Qwen/Qwen3-8B", Dtype::kFloat32, 60), 3);
  EXPECT_EQ(Plan(table, "Qwen/Qwen3-8B", Dtype::kFloat32, 141), 0);
  EXPECT_EQ(Plan(table, "Qwen/Qwen3-8B", Dtype::kBfloat16, 40), 3);
  EXPECT_EQ(Plan(table, "Qwen/Qwen3-8B", Dtype::kBfloat16, -1), 1);
  // No estimate (incomplete facts): planned, exit 0.
  EXPECT_EQ(Plan(table, "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16", Dtype::kBfloat16, 0), 0);
}

TEST(PlanTest, ListShowsEachPresetsEstimateAndVerdicts) {
  std::vector<presets::Preset> table = Shipped();
  PlanOptions o;
  testing::internal::CaptureStdout();
  EXPECT_EQ(ListPresetsCommand(table, o), 0);
  std::string out = testing::internal::GetCapturedStdout();
  auto line_of = [&](const std::string& model) {
    size_t at = out.find(model + " ");
    return at == std::string::npos ? std::string() : out.substr(at, out.find('\n', at) - at);
  };
  const presets::Preset* p = presets::FindPreset(table, "Qwen/Qwen3-8B");
  auto m = EstimateMemory(p->facts, ShapeOf(*p), p->max_seq_len, 32, Dtype::kBfloat16);
  std::string q8 = line_of("Qwen/Qwen3-8B");
  EXPECT_NE(q8.find(absl::StrFormat(" %.1f ", m->total() / (1 << 30))), std::string::npos) << q8;
  EXPECT_NE(q8.find("fits  fits"), std::string::npos) << q8;
  // No estimate without complete facts.
  std::string nemotron = line_of("nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16");
  EXPECT_NE(nemotron.find("-     -     -"), std::string::npos) << nemotron;
  // float32 (CPU ranks): Qwen3-30B-A3B-Instruct at 131,072 tokens no longer fits the H100.
  o.dtype = Dtype::kFloat32;
  testing::internal::CaptureStdout();
  ListPresetsCommand(table, o);
  out = testing::internal::GetCapturedStdout();
  const std::string moe = line_of("Qwen/Qwen3-30B-A3B-Instruct-2507");
  EXPECT_NE(moe.find("no  fits"), std::string::npos) << moe;
}

}  // namespace
}  // namespace lathe::client
