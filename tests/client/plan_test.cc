// The memory estimate of `lathe plan` against sums worked out by hand from
// the formulas in docs/launching.md.
#include "client/plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "presets/preset_table.h"

namespace lathe::client {
namespace {

using nlohmann::json;

// The model of config.json fields `j`, as `lathe plan --config` reads it.
runtime::ModelConfig Config(const json& j) {
  auto c = runtime::ParseModelConfig(j.dump());
  EXPECT_TRUE(c.ok()) << c.status() << "\n" << j.dump();
  return c.ok() ? *c : runtime::ModelConfig();
}

// A Llama-style dense model (no q/k norms, no biases).
json Dense() {
  return {{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 64}, {"num_hidden_layers", 2},
          {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"head_dim", 16}, {"intermediate_size", 128},
          {"vocab_size", 1000}};
}

parallel::MeshShape Shape(int tp, int ep) { return {1, 1, 4, tp, ep}; }

TEST(PlanTest, DenseModelOverTp2ByHand) {
  auto m = EstimateMemory(Config(Dense()), Shape(2, 1), 100, 8, Dtype::kFloat32);
  ASSERT_TRUE(m.ok()) << m.status();
  // Per rank: q/o 32 wide, one KV head (16), MLP 64, vocabulary 500.
  // embed + lm_head 2*500*64 = 64000; attention and the two norms 2*(2*64*32 + 2*64*16 + 2*64) + the final
  // norm 64 = 12608; MLP 2*3*64*64 = 24576. fp32, as the runtime holds them.
  EXPECT_DOUBLE_EQ(m->weights, 4.0 * (64000 + 12608 + 24576));
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
  auto m = EstimateMemory(Config(Dense()), Shape(2, 1), 4096, 8, Dtype::kFloat32);
  ASSERT_TRUE(m.ok()) << m.status();
  // Over 2048 tokens the runtime recomputes each layer: kept are the 2 layer inputs and
  // 3 more [T, 64] buffers; then one layer's backward (1.7 x 672 elements per token) or
  // one logprob chunk (4096 rows: 2.25 x [4096, 500]), whichever is larger.
  EXPECT_DOUBLE_EQ(m->activations, 4.0 * 4096 * 64 * (2 + 3) + std::max(1.7 * 4.0 * 4096 * 672,
                                                                          2.25 * 4.0 * 4096 * 500));
  // Linear in T from there: doubling the tokens doubles the activations.
  auto twice = EstimateMemory(Config(Dense()), Shape(2, 1), 8192, 8, Dtype::kFloat32);
  EXPECT_DOUBLE_EQ(twice->activations, 2 * m->activations);
}

TEST(PlanTest, FullFineTuningKeepsGradientAndMomentsBesideTheFp32Weights) {
  auto full = EstimateMemory(Config(Dense()), Shape(2, 1), 100, 0, Dtype::kFloat32);
  ASSERT_TRUE(full.ok());
  // 4 B weight (trained in place) + 4 B gradient + 8 B Adam m and v = 16 B per parameter.
  EXPECT_DOUBLE_EQ(full->weights + full->trainable_state, 4 * full->weights);
}

TEST(PlanTest, TiedEmbeddingsAndKvReplicationPastTheKvHeads) {
  json f = Dense();
  auto untied = EstimateMemory(Config(f), Shape(4, 1), 10, 8, Dtype::kFloat32);
  f["tie_word_embeddings"] = true;
  auto tied = EstimateMemory(Config(f), Shape(4, 1), 10, 8, Dtype::kFloat32);
  ASSERT_TRUE(untied.ok() && tied.ok());
  EXPECT_DOUBLE_EQ(untied->weights - tied->weights, 4.0 * 250 * 64);
  // tp 4 > 2 KV heads: each rank still holds a whole KV head (16 wide), as at tp 2.
  auto tp2 = EstimateMemory(Config(Dense()), Shape(2, 1), 10, 8, Dtype::kFloat32);
  // So going from tp 2 to tp 4 halves q, o, the MLP and the vocabulary slice, not k and v.
  const double q_tp4 = 4.0 * 2 * (2 * 64 * 16);
  const double q_tp2 = 4.0 * 2 * (2 * 64 * 32);
  EXPECT_DOUBLE_EQ(tp2->weights - untied->weights,
                   (q_tp2 - q_tp4) + 4.0 * 2 * 3 * 64 * (64 - 32) + 4.0 * 2 * (500 - 250) * 64);
}

TEST(PlanTest, ExpertsSplitOverEp) {
  json f = Dense();
  f["architectures"] = {"Qwen3MoeForCausalLM"};
  f["num_experts"] = 8;
  f["num_experts_per_tok"] = 2;
  f["moe_intermediate_size"] = 32;
  auto ep1 = EstimateMemory(Config(f), Shape(1, 1), 10, 0, Dtype::kFloat32);
  auto ep4 = EstimateMemory(Config(f), Shape(1, 4), 10, 0, Dtype::kFloat32);
  ASSERT_TRUE(ep1.ok() && ep4.ok());
  // Expert weights 2 layers * 8 experts * 3*64*32 fp32; ep 4 keeps a quarter.
  const double experts = 4.0 * 2 * 8 * 3 * 64 * 32;
  EXPECT_DOUBLE_EQ(ep1->weights - ep4->weights, experts * 3 / 4);
}

TEST(PlanTest, AnArchitectureWithoutDescriptionGetsNoEstimate) {
  runtime::ModelConfig c = Config(Dense());
  c.architecture = "Glm4MoeForCausalLM";
  auto m = EstimateMemory(c, Shape(1, 1), 10, 8, Dtype::kFloat32);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(m.status().message().find("Glm4MoeForCausalLM"), std::string::npos) << m.status();
}

TEST(PlanTest, Bfloat16HalvesWeightsAndActivationsAndKeepsFp32StateNormsAndLogprobsByHand) {
  auto m = EstimateMemory(Config(Dense()), Shape(2, 1), 100, 8, Dtype::kBfloat16);
  ASSERT_TRUE(m.ok()) << m.status();
  // The same shard as DenseModelOverTp2ByHand, 2 B per base weight.
  EXPECT_DOUBLE_EQ(m->weights, 2.0 * (64000 + 12608 + 24576));
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
  auto long_seq = EstimateMemory(Config(Dense()), Shape(2, 1), 4096, 8, Dtype::kBfloat16);
  ASSERT_TRUE(long_seq.ok());
  EXPECT_DOUBLE_EQ(long_seq->activations,
                   2.0 * 4096 * 64 * (2 + 3) + 4.0 * 4096 * 32 +
                       std::max(1.7 * 2.0 * 4096 * 672 + 4.0 * 4096 * 624, 2.25 * 4.0 * 4096 * 500));
}

TEST(PlanTest, Bfloat16FullFineTuningKeepsAnFp32MasterGradientAndMoments) {
  auto full = EstimateMemory(Config(Dense()), Shape(2, 1), 100, 0, Dtype::kBfloat16);
  ASSERT_TRUE(full.ok());
  // bf16 working copy (2 B) + fp32 master, gradient, m and v (16 B) = 18 B per parameter.
  EXPECT_DOUBLE_EQ(full->trainable_state, 8 * full->weights);
}

parallel::MeshShape WithCp(int tp, int cp) { return {1, 1, 8, tp, 1, cp}; }

TEST(PlanTest, ContextParallelRanksHoldTheirShareOfTokensAndTheGatheredKvByHand) {
  // 8192 tokens over cp 2: each rank's activations are those of 4096 tokens (recomputed).
  auto cp2 = EstimateMemory(Config(Dense()), WithCp(2, 2), 8192, 8, Dtype::kFloat32);
  auto half = EstimateMemory(Config(Dense()), Shape(2, 1), 4096, 8, Dtype::kFloat32);
  ASSERT_TRUE(cp2.ok() && half.ok());
  EXPECT_DOUBLE_EQ(cp2->activations, half->activations);
  EXPECT_DOUBLE_EQ(cp2->weights, half->weights);
  // With recompute one layer's gathered K and V (8192 x 16 each at tp 2) and their
  // gradients live at a time.
  EXPECT_DOUBLE_EQ(cp2->gathered_kv, 2 * (2 * 4.0 * 8192 * 16));
  EXPECT_DOUBLE_EQ(cp2->total(), cp2->weights + cp2->trainable_state + cp2->activations + cp2->gathered_kv);
  // 2048 tokens over cp 2 (1024 per rank: no recompute): every layer's gathered K/V stay to
  // the backward, and one layer's gradients come on top: (2 + 1) layers' worth, in bf16.
  auto kept = EstimateMemory(Config(Dense()), WithCp(2, 2), 2048, 8, Dtype::kBfloat16);
  auto own = EstimateMemory(Config(Dense()), Shape(2, 1), 1024, 8, Dtype::kBfloat16);
  ASSERT_TRUE(kept.ok() && own.ok());
  EXPECT_DOUBLE_EQ(kept->activations, own->activations);
  EXPECT_DOUBLE_EQ(kept->gathered_kv, 3 * (2 * 2.0 * 2048 * 16));
  // A length cp does not divide: each rank holds ceil(T / cp) tokens.
  auto odd = EstimateMemory(Config(Dense()), WithCp(2, 2), 4097, 8, Dtype::kFloat32);
  auto ceil = EstimateMemory(Config(Dense()), Shape(2, 1), 2049, 8, Dtype::kFloat32);
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
// A Qwen3.5-style hybrid: 3 of every 4 layers Gated DeltaNet, gated attention.
json Qwen3_5(int64_t h, int64_t layers, int64_t heads, int64_t kv, int64_t inter, int64_t linear_k,
             int64_t linear_v, bool tied) {
  return {{"architectures", {"Qwen3_5ForCausalLM"}}, {"hidden_size", h}, {"num_hidden_layers", layers},
          {"num_attention_heads", heads}, {"num_key_value_heads", kv}, {"head_dim", 256},
          {"intermediate_size", inter}, {"vocab_size", 248320}, {"tie_word_embeddings", tied},
          {"linear_num_key_heads", linear_k}, {"linear_num_value_heads", linear_v}, {"linear_key_head_dim", 128},
          {"linear_value_head_dim", 128}, {"linear_conv_kernel_dim", 4}, {"full_attention_interval", 4}};
}

json Qwen3_5Moe(int64_t h, int64_t layers, int64_t heads, int64_t linear_v, int64_t experts, int64_t k,
                int64_t width) {
  json f = Qwen3_5(h, layers, heads, 2, 0, 16, linear_v, false);
  f["architectures"] = {"Qwen3_5MoeForCausalLM"};
  f.erase("intermediate_size");
  f["num_experts"] = experts;
  f["num_experts_per_tok"] = k;
  f["moe_intermediate_size"] = width;
  f["shared_expert_intermediate_size"] = width;
  return f;
}

// Parameters (bf16 weights / 2 at tp 1, ep 1) equal sum(p.numel()) of the
// transformers 5.23 text model built on the meta device from the same sizes
// (Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM; lm_head counted once when tied).
TEST(PlanTest, Qwen3_5ParametersAreTransformersCount) {
  struct Case {
    const char* name;
    json config;
    double parameters;
  };
  const Case cases[] = {
      {"0.8B", Qwen3_5(1024, 24, 8, 2, 3584, 16, 16, true), 752393024},
      {"27B", Qwen3_5(5120, 64, 24, 4, 17408, 16, 48, false), 26895998464},
      {"35B-A3B", Qwen3_5Moe(2048, 40, 16, 32, 256, 8, 512), 34660610688},
      {"397B-A17B", Qwen3_5Moe(4096, 60, 32, 64, 512, 10, 1024), 396346350336},
  };
  for (const Case& c : cases) {
    auto m = EstimateMemory(Config(c.config), {1, 1, 1, 1, 1}, 16, 0, Dtype::kBfloat16);
    ASSERT_TRUE(m.ok()) << c.name << ": " << m.status();
    EXPECT_DOUBLE_EQ(m->weights / 2, c.parameters) << c.name;
  }
}

json TinyQwen3_5() {
  json f = Dense();
  f["architectures"] = {"Qwen3_5ForCausalLM"};
  f["head_dim"] = 32;
  f["vocab_size"] = 128;
  f["num_hidden_layers"] = 4;
  f["linear_num_key_heads"] = 2;
  f["linear_num_value_heads"] = 4;
  f["linear_key_head_dim"] = 16;
  f["linear_value_head_dim"] = 16;
  f["linear_conv_kernel_dim"] = 4;
  f["full_attention_interval"] = 4;
  return f;
}

TEST(PlanTest, Qwen3_5LinearAttentionLayersOverTp2ByHand) {
  auto m = EstimateMemory(Config(TinyQwen3_5()), Shape(2, 1), 100, 8, Dtype::kFloat32);
  ASSERT_TRUE(m.ok()) << m.status();
  // Per rank: q 64 (q_proj 128 with the gate), one KV head (32), MLP 64, vocabulary 64;
  // linear attention: 1 key head (16), 2 value heads (32), conv channels 64.
  // embed + lm_head 2*64*64 = 8192; layer 3 (full attention): 64*128 + 2*64*32 + 64*64 + 2*64 + 2*32 = 16576;
  // layers 0-2 (linear): in_proj_qkv/z/a/b 64*(64+32+2+2) + out_proj 32*64 + conv1d 64*4 + A_log, dt_bias 2*2
  // + gated norm 16 + layer norms 2*64 = 8852 each; MLP 4*3*64*64 = 49152; final norm 64.
  EXPECT_DOUBLE_EQ(m->weights, 4.0 * (8192 + 16576 + 3 * 8852 + 49152 + 64));
  // LoRA r=8: lm_head 8*(64+64) = 1024; q (gated), k, v, o 8*((64+128) + 2*(64+32) + (64+64)) = 4096;
  // in_proj_q/k/v, z, a, b, out_proj 8*(2*(64+16) + (64+32) + (64+32) + 2*(64+2) + (32+64)) = 4640 per layer;
  // MLP 4*8*3*(64+64) = 12288.
  EXPECT_DOUBLE_EQ(m->trainable_state, 16.0 * (1024 + 4096 + 3 * 4640 + 12288));
  // Elements per token: full attention 2*64 + 2*(64+2*32) + 64 + 3*64 (gate) = 640; linear
  // 2*64 + 3*64 + 2*32 + 2*2 = 388; MLP 2*64 + 4*64 = 384; final norm 64: 640 + 3*388 + 4*384 + 64 = 3404.
  // The delta rule's fp32 elements per linear layer: 11*2*16 + 6*32 + 5*2*64 + 2*16*16/64 = 1192.
  EXPECT_DOUBLE_EQ(m->activations, 1.7 * 4.0 * 100 * 3404 + 4.0 * 100 * 3 * 1192 + 2.25 * 4.0 * 100 * 64);
  // Recomputed (4096 tokens): the linear layer (388 + 384 elements, 1192 fp32) is the widest.
  auto long_run = EstimateMemory(Config(TinyQwen3_5()), Shape(2, 1), 4096, 8, Dtype::kFloat32);
  ASSERT_TRUE(long_run.ok());
  EXPECT_DOUBLE_EQ(long_run->activations,
                   4.0 * 4096 * 64 * (4 + 3) + std::max(1.7 * 4.0 * 4096 * (388 + 384) + 4.0 * 4096 * 1192,
                                                        2.25 * 4.0 * 4096 * 64));
}

// Under cp the Gated DeltaNet cores run on the whole sequence on every cp
// rank: their elements (the layer's 388 but the norm's 2*64: 260) and the
// delta rule's fp32 ones count the sequence's tokens, the rest the rank's.
TEST(PlanTest, Qwen3_5LinearAttentionCoresCountTheWholeSequenceUnderCp) {
  parallel::MeshShape cp2{1, 1, 4, 2, 1, 2};  // tp 2 x cp 2
  auto m = EstimateMemory(Config(TinyQwen3_5()), cp2, 200, 8, Dtype::kFloat32);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_DOUBLE_EQ(m->activations, 1.7 * 4.0 * (100 * 3404 + 100 * 3 * 260) + 4.0 * 200 * 3 * 1192 +
                                       2.25 * 4.0 * 100 * 64);
  // Recomputed (4,096 tokens per rank of 8,192): the linear layer (388 + 384 elements and the other
  // half sequence's 260, twice the 1192 fp32) is the widest.
  auto long_run = EstimateMemory(Config(TinyQwen3_5()), cp2, 8192, 8, Dtype::kFloat32);
  ASSERT_TRUE(long_run.ok());
  EXPECT_DOUBLE_EQ(long_run->activations,
                   4.0 * 4096 * 64 * (4 + 3) + std::max(1.7 * 4.0 * 4096 * (388 + 384 + 260) + 4.0 * 8192 * 1192,
                                                        2.25 * 4.0 * 4096 * 64));
  // Without cp the same rank tokens need less: the cores see only them.
  auto no_cp = EstimateMemory(Config(TinyQwen3_5()), Shape(2, 1), 4096, 8, Dtype::kFloat32);
  ASSERT_TRUE(no_cp.ok());
  EXPECT_LT(no_cp->activations, long_run->activations);
}

TEST(PlanTest, Qwen3_5SharedExpertByHand) {
  json moe = TinyQwen3_5();
  moe["architectures"] = {"Qwen3_5MoeForCausalLM"};
  moe.erase("intermediate_size");
  moe["num_experts"] = 8;
  moe["num_experts_per_tok"] = 2;
  moe["moe_intermediate_size"] = 32;
  moe["shared_expert_intermediate_size"] = 24;
  auto narrow = EstimateMemory(Config(moe), Shape(2, 2), 100, 8, Dtype::kFloat32);
  moe["shared_expert_intermediate_size"] = 48;
  auto wide = EstimateMemory(Config(moe), Shape(2, 2), 100, 8, Dtype::kFloat32);
  ASSERT_TRUE(narrow.ok() && wide.ok());
  // Per layer the shared SwiGLU grows from 3*64*12 to 3*64*24 on each tp rank (its gate, h -> 1, stays).
  EXPECT_DOUBLE_EQ(wide->weights - narrow->weights, 4.0 * 4 * 3 * 64 * 12);
  EXPECT_DOUBLE_EQ(wide->trainable_state - narrow->trainable_state, 16.0 * 4 * 8 * 3 * 12);
}

TEST(PlanTest, Qwen3_8BAt131072TokensFitsAnH100InBfloat16WithItsLayout) {
  std::vector<presets::Preset> table = Shipped();
  const presets::Preset* p = presets::FindPreset(table, "Qwen/Qwen3-8B");
  ASSERT_NE(p, nullptr);
  EXPECT_TRUE(p->verified);
  EXPECT_EQ(p->max_seq_len, 131072);
  auto bf16 = EstimateMemory(*p->config, ShapeOf(*p), p->max_seq_len, 32, Dtype::kBfloat16);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_TRUE(Fits(*bf16, kH100.gib)) << bf16->total() / (1 << 30) << " GiB";
  EXPECT_TRUE(Fits(*bf16, kH200.gib));
  // Its layout splits each sequence over 2 ranks: without that, tp 4 alone does not fit.
  EXPECT_EQ(p->cp, 2);
  parallel::MeshShape no_cp = ShapeOf(*p);
  no_cp.cp = 1;
  auto whole = EstimateMemory(*p->config, no_cp, p->max_seq_len, 32, Dtype::kBfloat16);
  ASSERT_TRUE(whole.ok());
  EXPECT_FALSE(Fits(*whole, kH100.gib)) << whole->total() / (1 << 30) << " GiB";
  // float32 (CPU ranks) takes more.
  auto fp32 = EstimateMemory(*p->config, ShapeOf(*p), p->max_seq_len, 32, Dtype::kFloat32);
  ASSERT_TRUE(fp32.ok());
  EXPECT_GT(fp32->total(), bf16->total() * 1.3);
}

// Every row whose config allows an estimate, declared ones included, is sized for
// LoRA rank 32 at its max_seq_len on an H100 in bf16.
TEST(PlanTest, EveryPresetFitsAnH100WithLoraAtItsMaxSeqLenInBfloat16) {
  int estimated = 0;
  for (const presets::Preset& p : Shipped()) {
    if (!p.config) {
      EXPECT_FALSE(p.verified) << p.base_model;
      EXPECT_NE(p.note.find("no estimate"), std::string::npos) << p.base_model << ": say why in the note";
      continue;
    }
    auto m = EstimateMemory(*p.config, ShapeOf(p), p.max_seq_len, 32, Dtype::kBfloat16);
    ASSERT_TRUE(m.ok()) << p.base_model;
    EXPECT_TRUE(Fits(*m, kH100.gib)) << p.base_model << " needs " << m->total() / (1 << 30) << " GiB";
    ++estimated;
  }
  EXPECT_GE(estimated, 20);
}

// Kimi-K2.6 / K2.7-Code: the smallest node group of 8-GPU nodes (tp 8, one ep
// rank and one cp rank per device) that fits an H100 at 131,072 tokens.
TEST(PlanTest, KimiPresetsTakeTheSmallestNodeGroupThatFits) {
  std::vector<presets::Preset> table = Shipped();
  for (const char* name : {"moonshotai/Kimi-K2.6", "moonshotai/Kimi-K2.7-Code"}) {
    const presets::Preset* p = presets::FindPreset(table, name);
    ASSERT_NE(p, nullptr);
    ASSERT_TRUE(p->config.has_value()) << p->config_error;
    auto m = EstimateMemory(*p->config, ShapeOf(*p), p->max_seq_len, 32, Dtype::kBfloat16);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_TRUE(Fits(*m, kH100.gib)) << m->total() / (1 << 30) << " GiB";
    // 1,026.4B parameters, of which each device holds 6 of the 384 experts in 60 layers in bf16.
    EXPECT_GT(m->weights, 2.0 * 6 * 60 * 3 * 7168 * 2048);
    parallel::MeshShape smaller{1, p->node_count - 2, 8, 8, (p->node_count - 2) * 8, p->node_count - 2};
    auto six = EstimateMemory(*p->config, smaller, p->max_seq_len, 32, Dtype::kBfloat16);
    ASSERT_TRUE(six.ok());
    EXPECT_FALSE(Fits(*six, kH100.gib)) << six->total() / (1 << 30) << " GiB";
  }
}

// GLM-5.2 at 65,536 tokens under cp: each of the 21 indexer layers' bool
// masks of the rank's two chunks (of T/2cp queries each, seeing the keys up
// to their ends: (2cp+1)/2cp of the sequence together) stay for the step,
// beside one layer's bf16 mask bias (recompute is on) and the 256 MiB score
// block; at cp 2 the row does not fit an H100.
TEST(PlanTest, Glm52KeySelectionIsCounted) {
  std::vector<presets::Preset> table = Shipped();
  const presets::Preset* p = presets::FindPreset(table, "zai-org/GLM-5.2-FP8");
  ASSERT_NE(p, nullptr);
  ASSERT_TRUE(p->config.has_value()) << p->config_error;
  ASSERT_EQ(p->cp, 4);
  auto m = EstimateMemory(*p->config, ShapeOf(*p), p->max_seq_len, 32, Dtype::kBfloat16);
  ASSERT_TRUE(m.ok()) << m.status();
  // Kept: 21 indexer layers' int32 top-2,048 keys of the rank's 16,384
  // queries. One layer at a time: the masks of 2 chunks of 8,192 queries
  // seeing 9/8 of the sequence's keys together, and their bf16 biases.
  const double indices = 21 * 16384.0 * 2048 * 4;
  const double mask = 8192.0 * 65536.0 * 9 / 8;
  EXPECT_DOUBLE_EQ(m->key_selection, indices + mask + 2 * mask + 4.0 * (1 << 26));
  EXPECT_TRUE(Fits(*m, kH100.gib)) << m->total() / (1 << 30) << " GiB";
  parallel::MeshShape cp2 = ShapeOf(*p);
  cp2.cp = 2;
  auto two = EstimateMemory(*p->config, cp2, p->max_seq_len, 32, Dtype::kBfloat16);
  ASSERT_TRUE(two.ok());
  EXPECT_DOUBLE_EQ(two->key_selection,
                   21 * 32768.0 * 2048 * 4 + 3 * (16384.0 * 65536.0 * 5 / 4) + 4.0 * (1 << 26));
  EXPECT_FALSE(Fits(*two, kH100.gib)) << two->total() / (1 << 30) << " GiB";
  // A sequence no longer than index_topk attends densely: nothing is selected.
  auto short_seq = EstimateMemory(*p->config, ShapeOf(*p), 2048, 32, Dtype::kBfloat16);
  ASSERT_TRUE(short_seq.ok());
  EXPECT_EQ(short_seq->key_selection, 0);
}

// Latent attention's activations (runtime/latent_attention.cc): per token at
// tp 2 on a small DeepSeek-V3 layer, worked out by hand.
TEST(PlanTest, LatentAttentionActivationsByHand) {
  json c = {{"architectures", {"DeepseekV3ForCausalLM"}}, {"hidden_size", 64}, {"intermediate_size", 128},
            {"moe_intermediate_size", 32}, {"num_hidden_layers", 1}, {"first_k_dense_replace", 1},
            {"num_attention_heads", 4}, {"num_key_value_heads", 4}, {"q_lora_rank", 24}, {"kv_lora_rank", 16},
            {"qk_nope_head_dim", 16}, {"qk_rope_head_dim", 8}, {"v_head_dim", 16}, {"n_routed_experts", 8},
            {"num_experts_per_tok", 2}, {"n_group", 1}, {"topk_group", 1}, {"vocab_size", 100}};
  auto m = EstimateMemory(Config(c), Shape(2, 1), 10, 8, Dtype::kFloat32);
  ASSERT_TRUE(m.ok()) << m.status();
  // 2 heads per rank, qk 24, v 16: norm 2*64; q_a and its norm 2*24; q_b 2*24; kv_a 16+8 and the latent
  // norm 16; kv_b 2*(16+16); roped q and key parts 2*8 + 8; q, the expanded key, the values padded to 24
  // and the padded output 4*2*24; o's input 2*16:
  // 128 + 48 + 48 + 24 + 16 + 64 + 24 + 192 + 32 = 576; the dense MLP 2*64 + 4*64 = 384; final norm 64.
  EXPECT_DOUBLE_EQ(m->activations, 1.7 * 4.0 * 10 * (576 + 384 + 64) + 2.25 * 4.0 * 10 * 50);
  // cp 2: the gathered K and V are the expanded heads (2 x (24 + 16) per token on this rank).
  auto cp = EstimateMemory(Config(c), WithCp(2, 2), 8192, 8, Dtype::kFloat32);
  ASSERT_TRUE(cp.ok());
  EXPECT_DOUBLE_EQ(cp->gathered_kv, 2 * (4.0 * 8192 * 2 * (24 + 16)));
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
  // No estimate (no description of its architecture): planned, exit 0.
  EXPECT_EQ(Plan(table, "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16", Dtype::kBfloat16, 0), 0);
}

// --config: a model outside the table planned from its own config.json; a
// path that cannot be read is refused by name.
TEST(PlanTest, ConfigFlagPlansFromAConfigJson) {
  const std::string dir = testing::TempDir() + "/plan_config_model";
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json") << Dense().dump();
  PlanOptions o;
  o.layout.model = "my-model";
  o.layout.devices_per_node = 2;
  o.layout.tp = 2;
  o.layout.max_seq_len = 100;
  o.lora_rank = 8;
  o.dtype = Dtype::kFloat32;
  for (const std::string& path : {dir, dir + "/config.json"}) {
    o.config_path = path;
    testing::internal::CaptureStdout();
    EXPECT_EQ(PlanCommand({}, o), 0) << path;
    const std::string out = testing::internal::GetCapturedStdout();
    auto m = EstimateMemory(Config(Dense()), Shape(2, 1), 100, 8, Dtype::kFloat32);
    EXPECT_NE(out.find(absl::StrFormat("  %-16s %9.2f GiB", "total", m->total() / (1 << 30))), std::string::npos) << out;
  }
  o.config_path = dir + "/missing.json";
  testing::internal::CaptureStderr();
  EXPECT_EQ(PlanCommand({}, o), 1);
  EXPECT_NE(testing::internal::GetCapturedStderr().find("missing.json"), std::string::npos);
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
  auto m = EstimateMemory(*p->config, ShapeOf(*p), p->max_seq_len, 32, Dtype::kBfloat16);
  std::string q8 = line_of("Qwen/Qwen3-8B");
  EXPECT_NE(q8.find(absl::StrFormat(" %.1f ", m->total() / (1 << 30))), std::string::npos) << q8;
  EXPECT_NE(q8.find("fits  fits"), std::string::npos) << q8;
  // No estimate without a described architecture.
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
