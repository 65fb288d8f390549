// config.json parsing: both transformers spellings, defaults, refusals.
#include "core/model_config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_replace.h"

namespace lathe::runtime {
namespace {

const char* kQwen3 = R"({"architectures":["Qwen3ForCausalLM"],"model_type":"qwen3","vocab_size":151936,
 "hidden_size":1024,"intermediate_size":3072,"num_hidden_layers":28,"num_attention_heads":16,
 "num_key_value_heads":8,"head_dim":128,"hidden_act":"silu","max_position_embeddings":40960,
 "rms_norm_eps":1e-06,"rope_scaling":null,"rope_theta":1000000,"sliding_window":null,
 "use_sliding_window":false,"tie_word_embeddings":true,"torch_dtype":"bfloat16","attention_bias":false})";

TEST(ModelConfigTest, ParsesQwen3Dense) {
  auto c = ParseModelConfig(kQwen3);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "Qwen3ForCausalLM");
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->q_dim(), 2048);  // heads × head_dim != hidden for small Qwen3
  EXPECT_EQ(c->kv_dim(), 1024);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_TRUE(c->qk_norm);
  EXPECT_DOUBLE_EQ(c->rope_theta, 1e6);
  EXPECT_EQ(c->dtype, "bfloat16");
  EXPECT_EQ(c->num_experts, 0);
  EXPECT_FALSE(c->IsMoeLayer(0));
}

TEST(ModelConfigTest, ParsesTransformers5SpellingOfMoe) {
  auto c = ParseModelConfig(R"({"architectures":["Qwen3MoeForCausalLM"],"vocab_size":100,
    "hidden_size":64,"intermediate_size":96,"num_hidden_layers":4,"num_attention_heads":4,
    "num_key_value_heads":2,"rope_parameters":{"rope_theta":10000000.0,"rope_type":"default"},
    "dtype":"float32","num_local_experts":8,"num_experts_per_tok":2,"moe_intermediate_size":32,
    "decoder_sparse_step":2,"mlp_only_layers":[1],"norm_topk_prob":true})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->rope_theta, 1e7);
  EXPECT_EQ(c->dtype, "float32");
  EXPECT_EQ(c->num_experts, 8);
  EXPECT_EQ(c->head_dim, 16);  // hidden / heads when absent
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_FALSE(c->IsMoeLayer(0));  // (0+1) % 2 != 0
  EXPECT_FALSE(c->IsMoeLayer(1));  // mlp_only_layers
  EXPECT_FALSE(c->IsMoeLayer(2));
  EXPECT_TRUE(c->IsMoeLayer(3));
}

TEST(ModelConfigTest, ParsesLlamaWithoutQkNorm) {
  auto c = ParseModelConfig(R"({"architectures":["LlamaForCausalLM"],"vocab_size":32000,
    "hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->qk_norm);
  EXPECT_EQ(c->num_key_value_heads, 32);
  EXPECT_EQ(c->head_dim, 128);
}

void ExpectRefused(const std::string& json, const std::string& needle) {
  auto c = ParseModelConfig(json);
  ASSERT_FALSE(c.ok()) << json;
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find(needle), std::string::npos) << c.status();
}

TEST(ModelConfigTest, RefusesWhatItCannotCompute) {
  ExpectRefused(R"({"architectures":["GPT2LMHeadModel"]})", "GPT2LMHeadModel");
  std::string base = R"({"architectures":["Qwen3ForCausalLM"],"vocab_size":10,"hidden_size":8,
    "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,)";
  ExpectRefused(base + R"("use_sliding_window":true,"max_window_layers":0})", "use_sliding_window");
  ExpectRefused(base + R"("rope_scaling":{"rope_type":"dynamic","factor":4.0}})", "rope_scaling.rope_type");
  ExpectRefused(base + R"("rope_scaling":{"type":"longrope","factor":4.0}})", "rope_scaling.type");
  ExpectRefused(base + R"("rope_parameters":{"rope_type":"llama3"}})", "rope_parameters.factor");
  ExpectRefused(base + R"("hidden_act":"gelu"})", "hidden_act");
  ExpectRefused(base + R"("quantization_config":{"quant_method":"awq","bits":4}})",
                "quantization_config.quant_method");
  ExpectRefused(base + R"("num_key_value_heads":3})", "num_key_value_heads");
  ExpectRefused(base + R"("mlp_bias":true})", "mlp_bias");
  ExpectRefused(base + R"("layer_types":["full_attention","chunked_attention"]})", "layer_types");
  ExpectRefused(R"({"architectures":["MistralForCausalLM"],"model_type":"mistral","vocab_size":10,
    "hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,
    "sliding_window":4096})", "sliding_window");
  ExpectRefused(R"({"architectures":["Qwen3ForCausalLM"],"hidden_size":8})", "vocab_size");
  ExpectRefused(R"({"architectures":["Qwen3ForCausalLM"],"vocab_size":"ten"})", "vocab_size");
  ExpectRefused("not json", "not a JSON object");
}

TEST(ModelConfigTest, FieldsOfTheWrongTypeAreRefusedNotThrown) {
  std::string base = R"({"architectures":["Qwen3ForCausalLM"],"vocab_size":10,"hidden_size":8,
    "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,)";
  ExpectRefused(base + R"("model_type":7})", "model_type");
  ExpectRefused(base + R"("rope_scaling":{"rope_type":["yarn"]}})", "rope_type");
  ExpectRefused(base + R"("rope_scaling":{"type":1.5}})", "type");
  ExpectRefused(base + R"("rope_parameters":{"rope_type":{}}})", "rope_type");
  ExpectRefused(base + R"("rope_scaling":"yarn"})", "rope_scaling");
  ExpectRefused(base + R"("rope_parameters":{"rope_type":"linear","factor":"2"}})", "rope_parameters.factor");
}

// Qwen2.5-7B-Instruct's config.json (transformers 4.x spelling).
constexpr char kQwen25[] = R"({"architectures":["Qwen2ForCausalLM"],"attention_dropout":0.0,
  "bos_token_id":151643,"eos_token_id":151645,"hidden_act":"silu","hidden_size":3584,
  "initializer_range":0.02,"intermediate_size":18944,"max_position_embeddings":32768,
  "max_window_layers":28,"model_type":"qwen2","num_attention_heads":28,"num_hidden_layers":28,
  "num_key_value_heads":4,"rms_norm_eps":1e-06,"rope_theta":1000000.0,"sliding_window":131072,
  "tie_word_embeddings":false,"torch_dtype":"bfloat16","use_cache":true,"use_sliding_window":false,
  "vocab_size":152064)";

TEST(ModelConfigTest, ParsesQwen25WithQkvBiases) {
  auto c = ParseModelConfig(std::string(kQwen25) + "}");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->qkv_bias);
  EXPECT_FALSE(c->o_bias);
  EXPECT_FALSE(c->qk_norm);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->rope.type, "default");
  EXPECT_DOUBLE_EQ(c->rope.theta, 1e6);
  // Qwen2.5's long-context recipe: yarn in rope_scaling.
  auto yarn = ParseModelConfig(std::string(kQwen25) + R"(,"rope_scaling":{"factor":4.0,)"
                               R"("original_max_position_embeddings":32768,"type":"yarn"}})");
  ASSERT_TRUE(yarn.ok()) << yarn.status();
  EXPECT_EQ(yarn->rope.type, "yarn");
  EXPECT_DOUBLE_EQ(yarn->rope.factor, 4.0);
  EXPECT_EQ(yarn->rope.original_max_position_embeddings, 32768);
  EXPECT_DOUBLE_EQ(yarn->rope.attention_factor, 0.1 * std::log(4.0) + 1.0);
  EXPECT_DOUBLE_EQ(yarn->rope.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(yarn->rope.beta_slow, 1.0);
  EXPECT_TRUE(yarn->rope.truncate);
}

TEST(ModelConfigTest, SlidingWindowIsRefusedOnlyWhenSmallerThanTheContext) {
  const std::string q = kQwen25;
  auto with = [&](const std::string& extra) { return q + extra + "}"; };
  // Enabled, but no layer slides (max_window_layers == layers) or the window covers the context.
  EXPECT_TRUE(ParseModelConfig(with(R"(,"use_sliding_window":true)")).ok()) << "layers 28.. slide: none";
  std::string wide = absl::StrReplaceAll(q, {{R"("max_window_layers":28)", R"("max_window_layers":4)"},
                                             {R"("sliding_window":131072)", R"("sliding_window":32768)"}});
  EXPECT_TRUE(ParseModelConfig(wide + R"(,"use_sliding_window":true})").ok());
  std::string narrow = absl::StrReplaceAll(q, {{R"("max_window_layers":28)", R"("max_window_layers":4)"},
                                               {R"("sliding_window":131072)", R"("sliding_window":4096)"}});
  ExpectRefused(narrow + R"(,"use_sliding_window":true})", "use_sliding_window' is true with sliding_window 4096");
  EXPECT_TRUE(ParseModelConfig(narrow + "}").ok()) << "use_sliding_window false: no window";
  ExpectRefused(narrow + R"(,"use_sliding_window":true,"layer_types":)"
                         R"(["full_attention","sliding_attention"]})", "sliding_window 4096");
  EXPECT_TRUE(ParseModelConfig(narrow + R"(,"use_sliding_window":true,"layer_types":)"
                                        R"(["full_attention","full_attention"]})").ok());
  // transformers' default window when the key is absent: 4096.
  const std::string mistral = R"({"architectures":["MistralForCausalLM"],"model_type":"mistral","vocab_size":10,
    "hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,)";
  ExpectRefused(mistral + R"("max_position_embeddings":32768})", "sliding_window' is 4096");
  EXPECT_TRUE(ParseModelConfig(mistral + R"("max_position_embeddings":4096})").ok());
  EXPECT_TRUE(ParseModelConfig(mistral + R"("sliding_window":null})").ok());
  const std::string moe = R"({"architectures":["Qwen3MoeForCausalLM"],"vocab_size":10,"hidden_size":8,
    "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"num_experts":2,
    "num_experts_per_tok":1,"moe_intermediate_size":4,"max_position_embeddings":8192,)";
  ExpectRefused(moe + R"("use_sliding_window":true})", "use_sliding_window' is true with sliding_window 4096");
  EXPECT_TRUE(ParseModelConfig(moe + R"("use_sliding_window":false})").ok());
  EXPECT_TRUE(ParseModelConfig(moe + R"("use_sliding_window":true,"sliding_window":8192})").ok());
}

// Llama-3.1-8B's config.json, 4.x and 5.x spellings.
constexpr char kLlama31Head[] = R"({"architectures":["LlamaForCausalLM"],"attention_bias":false,
  "hidden_act":"silu","hidden_size":4096,"intermediate_size":14336,"max_position_embeddings":131072,
  "mlp_bias":false,"model_type":"llama","num_attention_heads":32,"num_hidden_layers":32,
  "num_key_value_heads":8,"rms_norm_eps":1e-05,"tie_word_embeddings":false,"vocab_size":128256,)";

TEST(ModelConfigTest, ParsesLlama31RopeScalingInBothSpellings) {
  for (const char* rope :
       {R"("rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
           "original_max_position_embeddings":8192,"rope_type":"llama3"},"rope_theta":500000.0})",
        R"("rope_parameters":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
           "original_max_position_embeddings":8192,"rope_type":"llama3","rope_theta":500000.0}})"}) {
    auto c = ParseModelConfig(std::string(kLlama31Head) + rope);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->rope.type, "llama3");
    EXPECT_DOUBLE_EQ(c->rope.theta, 500000.0);
    EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
    EXPECT_DOUBLE_EQ(c->rope.factor, 8.0);
    EXPECT_DOUBLE_EQ(c->rope.low_freq_factor, 1.0);
    EXPECT_DOUBLE_EQ(c->rope.high_freq_factor, 4.0);
    EXPECT_EQ(c->rope.original_max_position_embeddings, 8192);
    EXPECT_DOUBLE_EQ(c->rope.attention_factor, 1.0);
    EXPECT_FALSE(c->qkv_bias);
  }
  auto biased = ParseModelConfig(absl::StrReplaceAll(std::string(kLlama31Head), {{R"("attention_bias":false)",
                                                                                  R"("attention_bias":true)"}}) +
                                 R"("rope_theta":500000.0})");
  ASSERT_TRUE(biased.ok()) << biased.status();
  EXPECT_TRUE(biased->qkv_bias);
  EXPECT_TRUE(biased->o_bias);
}

TEST(ModelConfigTest, BadRopeValuesAreRefusedNamingTheField) {
  const std::string head = kLlama31Head;
  auto llama3 = [&](const std::string& fields) {
    return head + R"("rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,)" + fields + "}}";
  };
  ExpectRefused(llama3(R"("factor":-8.0,"low_freq_factor":1.0,"high_freq_factor":4.0)"), "rope_parameters.factor");
  ExpectRefused(llama3(R"("factor":0.5,"low_freq_factor":1.0,"high_freq_factor":4.0)"), "rope_parameters.factor");
  ExpectRefused(llama3(R"("factor":1e300,"low_freq_factor":1.0,"high_freq_factor":4.0)"), "rope_parameters.factor");
  ExpectRefused(llama3(R"("factor":8.0,"low_freq_factor":4.0,"high_freq_factor":1.0)"),
                "rope_parameters.high_freq_factor");
  ExpectRefused(llama3(R"("factor":8.0,"low_freq_factor":4.0,"high_freq_factor":4.0)"),
                "rope_parameters.high_freq_factor");
  ExpectRefused(llama3(R"("factor":8.0,"low_freq_factor":-1.0,"high_freq_factor":4.0)"),
                "rope_parameters.low_freq_factor");
  ExpectRefused(llama3(R"("factor":8.0,"high_freq_factor":4.0)"), "rope_parameters.low_freq_factor");
  ExpectRefused(llama3(R"("factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,)"
                       R"("original_max_position_embeddings":0)"),
                "original_max_position_embeddings");
  ExpectRefused(head + R"("rope_theta":-1.0})", "rope_theta");
  ExpectRefused(head + R"("rope_parameters":{"rope_type":"default","rope_theta":1e13}})",
                "rope_parameters.rope_theta");
  ExpectRefused(head + R"("rope_scaling":{"type":"yarn","factor":4.0,"beta_fast":1.0,"beta_slow":32.0}})",
                "rope_scaling.beta_fast");
  ExpectRefused(head + R"("rope_scaling":{"type":"yarn","factor":4.0,"attention_factor":0}})",
                "rope_scaling.attention_factor");
  ExpectRefused(head + R"("rope_scaling":{"type":"yarn"}})", "rope_scaling.factor");
  ExpectRefused(head + R"("partial_rotary_factor":0.5})", "partial_rotary_factor");
  ExpectRefused(head + R"("rope_parameters":{"rope_type":"proportional","rope_theta":1e4}})",
                "rope_parameters.rope_type");
}

// The text model's fields under text_config, as a Qwen3.5 checkpoint's
// config.json holds them (0.8B sizes; the vision config shortened).
const char* kQwen3_5Wrapper = R"({"architectures":["Qwen3_5ForConditionalGeneration"],"model_type":"qwen3_5",
 "tie_word_embeddings":true,"vision_config":{"depth":2,"hidden_size":64,"model_type":"qwen3_5"},
 "text_config":{"model_type":"qwen3_5_text","vocab_size":248320,"hidden_size":1024,"intermediate_size":3584,
  "num_hidden_layers":8,"num_attention_heads":8,"num_key_value_heads":2,"head_dim":256,"hidden_act":"silu",
  "max_position_embeddings":262144,"rms_norm_eps":1e-06,"tie_word_embeddings":false,"attention_bias":false,
  "attn_output_gate":true,"dtype":"bfloat16","full_attention_interval":4,
  "layer_types":["linear_attention","linear_attention","linear_attention","full_attention",
                 "linear_attention","linear_attention","linear_attention","full_attention"],
  "linear_conv_kernel_dim":4,"linear_key_head_dim":128,"linear_value_head_dim":128,
  "linear_num_key_heads":16,"linear_num_value_heads":16,"mtp_num_hidden_layers":1,
  "rope_parameters":{"rope_type":"default","rope_theta":10000000,"partial_rotary_factor":0.25,
                     "mrope_section":[11,11,10],"mrope_interleaved":true}}})";

TEST(ModelConfigTest, ParsesTheQwen3_5MultimodalWrapper) {
  auto c = ParseModelConfig(kQwen3_5Wrapper);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "Qwen3_5ForConditionalGeneration");
  EXPECT_EQ(c->hidden_size, 1024);
  EXPECT_EQ(c->num_hidden_layers, 8);
  EXPECT_EQ(c->head_dim, 256);
  EXPECT_EQ(c->q_dim(), 2048);
  EXPECT_DOUBLE_EQ(c->rope_theta, 1e7);
  EXPECT_EQ(c->dtype, "bfloat16");
  // The top-level flag ties lm_head; text_config's is ignored (as transformers does).
  EXPECT_TRUE(c->tie_word_embeddings);
  ASSERT_EQ(c->layer_types.size(), 8u);
  for (int64_t i = 0; i < 8; ++i) EXPECT_EQ(c->IsLinearAttentionLayer(i), (i + 1) % 4 != 0) << i;
  EXPECT_TRUE(c->IsHybrid());
  EXPECT_EQ(c->linear_attention.num_key_heads, 16);
  EXPECT_EQ(c->linear_attention.num_value_heads, 16);
  EXPECT_EQ(c->linear_attention.key_head_dim, 128);
  EXPECT_EQ(c->linear_attention.value_head_dim, 128);
  EXPECT_EQ(c->linear_attention.conv_kernel_size, 4);
  EXPECT_EQ(c->linear_attention.conv_dim(), 2 * 2048 + 2048);
  EXPECT_DOUBLE_EQ(c->rotary.partial_rotary_factor, 0.25);
  EXPECT_EQ(c->rotary.rotary_dim, 64);
  EXPECT_EQ(c->rotary.mrope_section, (std::vector<int64_t>{11, 11, 10}));
  EXPECT_TRUE(c->rotary.mrope_interleaved);
  EXPECT_TRUE(c->attn_output_gate);
  EXPECT_TRUE(c->qk_norm);
  EXPECT_EQ(c->norm_style, NormStyle::kOnePlusWeight);
  EXPECT_EQ(c->num_experts, 0);
  EXPECT_EQ(c->shared_expert.intermediate_size, 0);
  EXPECT_EQ(c->checkpoint.weight_prefix, "model.language_model.");
  EXPECT_EQ(c->checkpoint.lm_head, "lm_head.weight");
  EXPECT_EQ(c->checkpoint.skip_prefixes, (std::vector<std::string>{"model.visual.", "mtp."}));
}

TEST(ModelConfigTest, TheWrapperTiesOnlyByItsTopLevelFlag) {
  std::string untied = kQwen3_5Wrapper;
  untied.replace(untied.find("\"tie_word_embeddings\":true"), 26, "\"tie_word_embeddings\":false");
  untied.replace(untied.find("\"tie_word_embeddings\":false,\"attention_bias\""), 27, "\"tie_word_embeddings\":true");
  auto c = ParseModelConfig(untied);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->tie_word_embeddings);
}

const char* kQwen3_5MoeText = R"({"architectures":["Qwen3_5MoeForCausalLM"],"model_type":"qwen3_5_moe_text",
 "vocab_size":128,"hidden_size":64,"num_hidden_layers":6,"num_attention_heads":4,"num_key_value_heads":2,
 "head_dim":32,"linear_num_key_heads":2,"linear_num_value_heads":4,"linear_key_head_dim":16,
 "linear_value_head_dim":8,"linear_conv_kernel_dim":3,"full_attention_interval":3,
 "num_experts":8,"num_experts_per_tok":2,"moe_intermediate_size":32,"shared_expert_intermediate_size":48,
 "rope_parameters":{"rope_type":"default","rope_theta":10000000.0,"partial_rotary_factor":0.5}})";

TEST(ModelConfigTest, ParsesATextOnlyQwen3_5MoeConfig) {
  auto c = ParseModelConfig(kQwen3_5MoeText);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->checkpoint.weight_prefix, "model.");
  EXPECT_EQ(c->checkpoint.skip_prefixes, (std::vector<std::string>{"model.visual.", "mtp."}));
  EXPECT_EQ(c->intermediate_size, 0);  // no dense MLP
  EXPECT_FALSE(c->HasDenseMlp());
  for (int64_t i = 0; i < 6; ++i) {
    EXPECT_TRUE(c->IsMoeLayer(i)) << i;
    EXPECT_EQ(c->IsLinearAttentionLayer(i), (i + 1) % 3 != 0) << i;  // from full_attention_interval
  }
  EXPECT_EQ(c->num_experts, 8);
  EXPECT_EQ(c->num_experts_per_tok, 2);
  EXPECT_EQ(c->moe_intermediate_size, 32);
  EXPECT_TRUE(c->norm_topk_prob);  // the Qwen3.5 router always renormalises
  EXPECT_EQ(c->shared_expert.intermediate_size, 48);
  EXPECT_TRUE(c->shared_expert.sigmoid_gate);
  EXPECT_EQ(c->linear_attention.conv_kernel_size, 3);
  EXPECT_EQ(c->linear_attention.value_dim(), 32);
  EXPECT_EQ(c->rotary.rotary_dim, 16);
  EXPECT_TRUE(c->rotary.mrope_section.empty());
  EXPECT_FALSE(c->tie_word_embeddings);
}

TEST(ModelConfigTest, OtherModelsKeepTheirDefaults) {
  auto c = ParseModelConfig(kQwen3);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->layer_types.empty());
  EXPECT_FALSE(c->IsHybrid());
  EXPECT_FALSE(c->attn_output_gate);
  EXPECT_EQ(c->norm_style, NormStyle::kWeight);
  EXPECT_EQ(c->rotary.rotary_dim, 128);
  EXPECT_EQ(c->checkpoint.weight_prefix, "model.");
  EXPECT_TRUE(c->checkpoint.skip_prefixes.empty());
}

// `key` of the text config set to `value` (JSON text), in the text-only MoE config.
std::string WithField(const std::string& key, const std::string& value) {
  std::string json = kQwen3_5MoeText;
  json.insert(json.size() - 1, ",\"" + key + "\":" + value);
  return json;
}

TEST(ModelConfigTest, RefusesQwen3_5ValuesTheModelCannotBeBuiltWith) {
  ExpectRefused(WithField("layer_types", R"(["linear_attention","full_attention"])"), "one type per layer");
  ExpectRefused(WithField("layer_types", R"(["linear_attention","linear_attention","sliding_attention",
    "linear_attention","linear_attention","full_attention"])"), "entry 2 is \"sliding_attention\"");
  ExpectRefused(WithField("layer_types", "\"full_attention\""), "layer_types");
  ExpectRefused(WithField("full_attention_interval", "0"), "full_attention_interval");
  ExpectRefused(WithField("num_hidden_layers", "1000000000000"), "num_hidden_layers");
  ExpectRefused(WithField("linear_num_key_heads", "0"), "linear_num_key_heads");
  ExpectRefused(WithField("linear_num_key_heads", "-2"), "linear_num_key_heads");
  ExpectRefused(WithField("linear_num_value_heads", "3"), "multiple of linear_num_key_heads");
  ExpectRefused(WithField("linear_num_value_heads", "4611686018427387904"), "linear_num_value_heads");
  ExpectRefused(WithField("linear_key_head_dim", "0"), "linear_key_head_dim");
  ExpectRefused(WithField("linear_value_head_dim", "1.5"), "linear_value_head_dim");
  ExpectRefused(WithField("linear_conv_kernel_dim", "0"), "linear_conv_kernel_dim");
  ExpectRefused(WithField("linear_conv_kernel_dim", "100000"), "linear_conv_kernel_dim");
  std::string top_level = WithField("partial_rotary_factor", "0");  // read where rope_parameters has none
  top_level.replace(top_level.find(",\"partial_rotary_factor\":0.5"), 28, "");
  ExpectRefused(top_level, "partial_rotary_factor");
  ExpectRefused(WithField("attn_output_gate", "false"), "attn_output_gate");
  ExpectRefused(WithField("num_experts_per_tok", "9"), "num_experts_per_tok");
  ExpectRefused(WithField("shared_expert_intermediate_size", "0"), "shared_expert_intermediate_size");
  ExpectRefused(WithField("num_attention_heads", "0"), "num_attention_heads");
  ExpectRefused(WithField("output_router_logits", "true"), "output_router_logits");
  std::string overriding = kQwen3_5MoeText;  // rope_parameters' factor wins over the top-level one
  overriding.replace(overriding.find("\"partial_rotary_factor\":0.5"), 27, "\"partial_rotary_factor\":1.5");
  ExpectRefused(overriding, "partial_rotary_factor");
  ExpectRefused(R"({"architectures":["Qwen3_5ForConditionalGeneration"]})", "text_config");
  ExpectRefused(R"({"architectures":["Qwen3_5ForCausalLM"],"vocab_size":10,"hidden_size":8,
    "intermediate_size":8,"num_hidden_layers":4,"num_attention_heads":2,"num_experts":4})", "dense");
  ExpectRefused(R"({"architectures":["Qwen3_5ForCausalLM"],"vocab_size":10,"hidden_size":8,
    "intermediate_size":8,"num_hidden_layers":4,"num_attention_heads":2,"num_local_experts":4})", "dense");
}

TEST(ModelConfigTest, LoadReadsTheMultimodalWrapper) {
  const std::string dir = ::testing::TempDir() + "/qwen3_5_config";
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json") << kQwen3_5Wrapper;
  auto read = LoadModelConfig(dir);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->linear_attention.num_value_heads, 16);
  EXPECT_EQ(read->checkpoint.weight_prefix, "model.language_model.");
}

}  // namespace
}  // namespace lathe::runtime
