// The shipped preset table parses and every row's layout fits its config;
// malformed rows are refused with their name; lookup and layout resolution.
#include "presets/preset_table.h"

#include <gtest/gtest.h>

#include "presets/layout.h"

namespace lathe::presets {
namespace {

std::vector<Preset> Shipped() {
  auto table = LoadPresets(LATHE_PRESETS_FILE);
  EXPECT_TRUE(table.ok()) << table.status();
  return table.ok() ? *table : std::vector<Preset>();
}

TEST(PresetTableTest, ShippedTableHasTheVerifiedQwen3FamilyAndDeclaredMoeModels) {
  std::vector<Preset> table = Shipped();
  for (const char* name : {"Qwen/Qwen3-0.6B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B", "Qwen/Qwen3-30B-A3B"}) {
    const Preset* p = FindPreset(table, name);
    ASSERT_NE(p, nullptr) << name;
    EXPECT_TRUE(p->verified) << name;
    EXPECT_TRUE(p->config.has_value()) << name;
    EXPECT_TRUE(p->architecture == "Qwen3ForCausalLM" || p->architecture == "Qwen3MoeForCausalLM") << name;
  }
  int declared = 0;
  for (const Preset& p : table) declared += p.verified ? 0 : 1;
  EXPECT_GE(declared, 4);
  const Preset* moe = FindPreset(table, "Qwen3-30B-A3B");
  ASSERT_NE(moe, nullptr);
  EXPECT_EQ(moe->config->num_experts, 128);
  EXPECT_EQ(moe->config->num_experts % moe->ep, 0);
  EXPECT_EQ(moe->devices_per_node % moe->tp, 0);
}

// The base models users come for, with the longest datum each is offered at.
TEST(PresetTableTest, ShippedTableHasEverySupportedModelAtItsLength) {
  std::vector<Preset> table = Shipped();
  const std::pair<const char*, int64_t> supported[] = {
      {"Qwen/Qwen3-0.6B", 8192},
      {"Qwen/Qwen3-4B-Instruct-2507", 40960},
      {"Qwen/Qwen3-8B", 131072},
      {"Qwen/Qwen3-30B-A3B-Instruct-2507", 131072},
      {"Qwen/Qwen3.5-0.8B", 131072},
      {"Qwen/Qwen3.5-2B", 131072},
      {"Qwen/Qwen3.5-4B", 131072},
      {"Qwen/Qwen3.5-9B", 131072},
      {"Qwen/Qwen3.5-27B", 131072},
      {"Qwen/Qwen3.5-35B-A3B", 131072},
      {"Qwen/Qwen3.5-122B-A10B", 131072},
      {"Qwen/Qwen3.5-397B-A17B", 131072},
      {"Qwen/Qwen3.6-27B", 131072},
      {"Qwen/Qwen3.6-35B-A3B", 131072},
      {"deepseek-ai/DeepSeek-V4-Flash", 131072},
      {"moonshotai/Kimi-K2.6", 131072},
      {"moonshotai/Kimi-K2.7-Code", 131072},
      {"nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16", 262144},
      {"zai-org/GLM-5.2-FP8", 65536},
  };
  for (const auto& [name, max_seq_len] : supported) {
    const Preset* p = FindPreset(table, name);
    ASSERT_NE(p, nullptr) << name;
    EXPECT_EQ(p->base_model, name);
    EXPECT_EQ(p->max_seq_len, max_seq_len) << name;
    // Qwen3 dense and MoE, the Qwen3.5 / Qwen3.6 hybrids, the Kimi wrapper
    // (DeepSeek-V3's architecture) and GLM-5 run today; the others are declared, with a note on what the
    // estimate leaves out.
    const bool qwen3 = p->architecture == "Qwen3ForCausalLM" || p->architecture == "Qwen3MoeForCausalLM";
    const bool hybrid = p->architecture.rfind("Qwen3_5", 0) == 0;
    const bool mla = p->architecture == "KimiK25ForConditionalGeneration" ||
                     p->architecture == "GlmMoeDsaForCausalLM";
    EXPECT_EQ(p->verified, qwen3 || hybrid || mla) << name;
    EXPECT_TRUE(!p->verified || p->config.has_value()) << name;
    if (!qwen3) {
      EXPECT_FALSE(p->note.empty()) << name;
    }
    // Its last part finds it alone (a model folder named after it).
    std::string_view id(name);
    EXPECT_EQ(FindPreset(table, id.substr(id.rfind('/') + 1)), p) << name;
  }
}

// The Qwen3.5 / Qwen3.6 rows carry their linear-attention layers, output gate
// and shared expert, so the layout check and the estimate see them.
TEST(PresetTableTest, Qwen3_5RowsCarryTheirHybridConfig) {
  std::vector<Preset> table = Shipped();
  int rows = 0;
  for (const Preset& p : table) {
    if (p.architecture.rfind("Qwen3_5", 0) != 0) continue;
    ++rows;
    ASSERT_TRUE(p.config.has_value()) << p.base_model;
    const runtime::ModelConfig& c = *p.config;
    EXPECT_TRUE(c.attn_output_gate) << p.base_model;
    EXPECT_EQ(c.linear_attention.key_head_dim, 128) << p.base_model;
    EXPECT_EQ(c.linear_attention.conv_kernel_size, 4) << p.base_model;
    EXPECT_EQ(c.vocab_size, 248320) << p.base_model;
    EXPECT_TRUE(c.IsHybrid()) << p.base_model;
    EXPECT_EQ(c.linear_attention.num_key_heads, 16) << p.base_model;
    int64_t linear = 0;
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) linear += c.IsLinearAttentionLayer(i) ? 1 : 0;
    EXPECT_EQ(linear, c.num_hidden_layers * 3 / 4) << p.base_model;
    EXPECT_EQ(c.linear_attention.num_value_heads % p.tp, 0) << p.base_model;
    if (c.num_experts > 0) {
      EXPECT_EQ(c.shared_expert.intermediate_size, c.moe_intermediate_size) << p.base_model;
      EXPECT_TRUE(c.shared_expert.sigmoid_gate) << p.base_model;
    }
  }
  EXPECT_EQ(rows, 10);
  const Preset* big = FindPreset(table, "Qwen/Qwen3.5-27B");
  ASSERT_NE(big, nullptr);
  EXPECT_EQ(big->config->linear_attention.num_value_heads, 48);
  EXPECT_EQ(big->dims.linear_num_value_heads, 48);
}

// The Kimi rows read the real config (DeepSeek-V3 text model in the K2.5
// wrapper): latent attention, 384 experts, one dense layer, untied head.
TEST(PresetTableTest, KimiRowsCarryTheirRealConfig) {
  std::vector<Preset> table = Shipped();
  for (const char* name : {"moonshotai/Kimi-K2.6", "moonshotai/Kimi-K2.7-Code"}) {
    const Preset* p = FindPreset(table, name);
    ASSERT_NE(p, nullptr) << name;
    ASSERT_TRUE(p->config.has_value()) << name << ": " << p->config_error;
    EXPECT_TRUE(p->estimate_as.empty()) << name;
    const runtime::ModelConfig& c = *p->config;
    EXPECT_EQ(c.architecture, "KimiK25ForConditionalGeneration");
    EXPECT_EQ(c.latent_attention.q_lora_rank, 1536);
    EXPECT_EQ(c.latent_attention.kv_lora_rank, 512);
    EXPECT_EQ(c.num_experts, 384);
    EXPECT_FALSE(c.IsMoeLayer(0));
    EXPECT_TRUE(c.IsMoeLayer(1));
    EXPECT_FALSE(c.tie_word_embeddings);
    EXPECT_EQ(c.checkpoint.weight_prefix, "language_model.model.");
    EXPECT_EQ(p->max_seq_len, 131072);
    EXPECT_EQ(c.num_experts / p->ep, 6);
  }
}

const char* kHybridRow = R"({"presets": [{"base_model": "Org/H", "architecture": "Qwen3_5ForCausalLM",
  "node_count": 1, "devices_per_node": 8, "tp": 8, "ep": 1, "max_seq_len": 4096, "verified": false,
  "config": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
            "head_dim": 16, "intermediate_size": 128, "vocab_size": 1000, "attn_output_gate": true,
            "linear_num_key_heads": %K%, "linear_num_value_heads": 8, "linear_key_head_dim": 16,
            "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "full_attention_interval": 4}}]})";

std::string HybridRow(const std::string& key_heads) {
  std::string s = kHybridRow;
  s.replace(s.find("%K%"), 3, key_heads);
  return s;
}

TEST(PresetTableTest, RefusesHybridRowsWhoseLinearHeadsDoNotSplit) {
  auto ok = ParsePresets(HybridRow("8"));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_TRUE((*ok)[0].config.has_value());
  auto tp = ParsePresets(HybridRow("4"));  // 4 key heads over tp 8
  ASSERT_FALSE(tp.ok());
  EXPECT_NE(tp.status().message().find("linear-attention key heads 4 are not divisible by tp 8"), std::string::npos)
      << tp.status();
  auto ratio = ParsePresets(HybridRow("3"));
  ASSERT_FALSE(ratio.ok());
  EXPECT_NE(ratio.status().message().find("multiple of linear_num_key_heads"), std::string::npos) << ratio.status();
  std::string gate = HybridRow("8");
  gate.replace(gate.find("\"attn_output_gate\": true"), 24, "\"attn_output_gate\": 1");
  EXPECT_FALSE(ParsePresets(gate).ok());
}

// A row of an architecture lathe does not describe: `estimate_as` names the
// one whose table stands in; without it the row has no estimate.
TEST(PresetTableTest, EstimateAsReadsTheConfigAsTheStandIn) {
  const std::string row = R"({"presets": [{"base_model": "Org/G", "architecture": "Glm4MoeForCausalLM",
    %AS% "node_count": 1, "devices_per_node": 8, "tp": 8, "ep": 8, "max_seq_len": 4096, "verified": %V%,
    "config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8,
               "head_dim": 16, "intermediate_size": 128, "vocab_size": 1000, "num_experts": 8,
               "num_experts_per_tok": 2, "moe_intermediate_size": 32}}]})";
  auto make = [&](const std::string& as, const std::string& verified) {
    std::string s = row;
    s.replace(s.find("%AS%"), 4, as);
    s.replace(s.find("%V%"), 3, verified);
    return ParsePresets(s);
  };
  auto stand_in = make(R"("estimate_as": "Qwen3MoeForCausalLM",)", "false");
  ASSERT_TRUE(stand_in.ok()) << stand_in.status();
  ASSERT_TRUE((*stand_in)[0].config.has_value());
  EXPECT_EQ((*stand_in)[0].config->architecture, "Qwen3MoeForCausalLM");
  EXPECT_EQ((*stand_in)[0].architecture, "Glm4MoeForCausalLM");
  EXPECT_EQ((*stand_in)[0].dims.num_experts, 8);
  auto none = make("", "false");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE((*none)[0].config.has_value());
  EXPECT_NE((*none)[0].config_error.find("Glm4MoeForCausalLM"), std::string::npos);
  EXPECT_EQ((*none)[0].dims.num_experts, 8);  // the layout is still checked
  EXPECT_FALSE(make(R"("estimate_as": "Qwen3MoeForCausalLM",)", "true").ok()) << "a verified row runs its own";
  EXPECT_FALSE(make(R"("estimate_as": "NoSuchForCausalLM",)", "false").ok());
}

TEST(PresetTableTest, LookupByFullIdOrLastPartIgnoringCase) {
  std::vector<Preset> table = Shipped();
  ASSERT_NE(FindPreset(table, "qwen/qwen3-8b"), nullptr);
  EXPECT_EQ(FindPreset(table, "Qwen3-8B")->base_model, "Qwen/Qwen3-8B");
  EXPECT_EQ(FindPreset(table, "Other/Qwen3-8B"), nullptr);
  EXPECT_EQ(FindPreset(table, "tiny-qwen3-moe"), nullptr);
}

const char* kRow = R"({"presets": [{"base_model": "Org/M", "architecture": "Qwen3ForCausalLM", "node_count": 1,
  "devices_per_node": 4, "tp": %TP%, "ep": 1, "max_seq_len": 4096, "verified": true,
  "config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
            "head_dim": 16, "intermediate_size": 128, "vocab_size": 1000}}]})";

std::string Row(const std::string& tp) {
  std::string s = kRow;
  s.replace(s.find("%TP%"), 4, tp);
  return s;
}

TEST(PresetTableTest, RefusesRowsWithTheirName) {
  EXPECT_TRUE(ParsePresets(Row("2")).ok());
  auto heads = ParsePresets(Row("4"));  // 6 heads over tp 4
  ASSERT_FALSE(heads.ok());
  EXPECT_NE(heads.status().message().find("preset 'Org/M'"), std::string::npos) << heads.status();
  EXPECT_NE(heads.status().message().find("heads"), std::string::npos) << heads.status();
  EXPECT_FALSE(ParsePresets(Row("\"2\"")).ok());
  EXPECT_FALSE(ParsePresets(Row("0")).ok());
  // A degree past int's range would wrap into a plausible one: refused.
  EXPECT_FALSE(ParsePresets(Row("4294967298")).ok());
  EXPECT_FALSE(ParsePresets("{\"presets\": 3}").ok());
  EXPECT_FALSE(ParsePresets("not json").ok());
  std::string twice = Row("2");
  std::string row = twice.substr(twice.find('[') + 1, twice.rfind(']') - twice.find('[') - 1);
  auto dup = ParsePresets("{\"presets\": [" + row + "," + row + "]}");
  ASSERT_FALSE(dup.ok());
  EXPECT_NE(dup.status().message().find("twice"), std::string::npos);
  std::string incomplete = Row("2");
  incomplete.replace(incomplete.find("\"vocab_size\": 1000"), 18, "\"vocab_size\": 0");
  auto refused = ParsePresets(incomplete);
  ASSERT_FALSE(refused.ok()) << "a verified row needs a config that parses";
  EXPECT_NE(refused.status().message().find("'config'"), std::string::npos) << refused.status();
  std::string named = Row("2");
  named.replace(named.find("\"config\": {"), 11, "\"config\": {\"architectures\": [\"X\"], ");
  EXPECT_FALSE(ParsePresets(named).ok()) << "the row's architecture is the config's";
  EXPECT_EQ(LoadPresets("/nonexistent/models.json").status().code(), absl::StatusCode::kNotFound);
}

TEST(LayoutTest, PresetFillsWhatTheRequestLeavesOut) {
  std::vector<Preset> table = Shipped();
  LayoutRequest r;
  r.model = "Qwen3-30B-A3B";
  r.replicas = 2;
  auto l = ResolveLayout(table, r, false);
  ASSERT_TRUE(l.ok()) << l.status();
  const Preset* p = FindPreset(table, "Qwen/Qwen3-30B-A3B");
  EXPECT_EQ(l->shape.replicas, 2);
  EXPECT_EQ(l->shape.node_count, p->node_count);
  EXPECT_EQ(l->shape.devices_per_node, p->devices_per_node);
  EXPECT_EQ(l->shape.tp, p->tp);
  EXPECT_EQ(l->shape.ep, p->ep);
  EXPECT_EQ(l->max_seq_len, p->max_seq_len);
  ASSERT_TRUE(l->preset.has_value());
  EXPECT_EQ(l->preset->base_model, "Qwen/Qwen3-30B-A3B");
  r.ep = 4;
  r.max_seq_len = 1024;
  l = ResolveLayout(table, r, false);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->shape.ep, 4);
  EXPECT_EQ(l->shape.cp, p->cp);
  EXPECT_EQ(l->max_seq_len, 1024);
  r.cp = 2;
  l = ResolveLayout(table, r, false);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->shape.cp, 2);
  r.cp = -1;
  EXPECT_EQ(ResolveLayout(table, r, false).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PresetTableTest, ContextParallelDegreeIsOptionalAndChecked) {
  auto parsed = ParsePresets(Row("2"));
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->front().cp, 1);
  std::string with_cp = Row("2");
  with_cp.replace(with_cp.find("\"ep\": 1"), 7, "\"ep\": 1, \"cp\": 2");
  parsed = ParsePresets(with_cp);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->front().cp, 2);
  EXPECT_EQ(ToProto(parsed->front()).layout().cp(), 2);
  std::string too_wide = Row("2");
  too_wide.replace(too_wide.find("\"ep\": 1"), 7, "\"ep\": 1, \"cp\": 4");  // tp 2 x cp 4 > 4 devices
  auto refused = ParsePresets(too_wide);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("tp 2 x cp 4"), std::string::npos) << refused.status();
  std::string zero = Row("2");
  zero.replace(zero.find("\"ep\": 1"), 7, "\"ep\": 1, \"cp\": 0");
  EXPECT_FALSE(ParsePresets(zero).ok());
}

TEST(LayoutTest, ModelOutsideThePresetsNeedsAnExplicitLayout) {
  std::vector<Preset> table = Shipped();
  LayoutRequest r;
  r.model = "my-model";
  auto refused = ResolveLayout(table, r, false);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("not in the preset table"), std::string::npos);
  EXPECT_NE(refused.status().message().find("--tp"), std::string::npos);
  r.tp = 2;
  auto l = ResolveLayout(table, r, false);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->shape.tp, 2);
  EXPECT_EQ(l->shape.node_count, 1);
  EXPECT_EQ(l->shape.devices_per_node, 0);  // from the world
  EXPECT_FALSE(l->preset.has_value());
}

TEST(LayoutTest, UnverifiedPresetsAreRefusedUnlessPlanning) {
  std::vector<Preset> table = Shipped();
  LayoutRequest r;
  r.model = "deepseek-ai/DeepSeek-V4-Flash";
  EXPECT_EQ(ResolveLayout(table, r, false).status().code(), absl::StatusCode::kFailedPrecondition);
  auto planned = ResolveLayout(table, r, true);
  ASSERT_TRUE(planned.ok());
  EXPECT_EQ(planned->shape.node_count, FindPreset(table, r.model)->node_count);
  EXPECT_GT(planned->shape.node_count, 1);
}

TEST(PresetTableTest, ProtoCarriesTheLayout) {
  std::vector<Preset> table = Shipped();
  lathe::v1::ModelPreset m = ToProto(*FindPreset(table, "Qwen3-8B"));
  EXPECT_EQ(m.base_model(), "Qwen/Qwen3-8B");
  EXPECT_EQ(m.layout().tp(), 4);
  EXPECT_EQ(m.layout().cp(), 2);
  EXPECT_EQ(m.layout().devices_per_node(), 8);
  EXPECT_TRUE(m.verified());
}

}  // namespace
}  // namespace lathe::presets
