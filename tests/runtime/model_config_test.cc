// config.json parsing: both transformers spellings, defaults, refusals.
#include "runtime/model_config.h"

#include <gtest/gtest.h>

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
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find(needle), std::string::npos) << c.status();
}

TEST(ModelConfigTest, RefusesWhatItCannotCompute) {
  ExpectRefused(R"({"architectures":["GPT2LMHeadModel"]})", "GPT2LMHeadModel");
  std::string base = R"({"architectures":["Qwen3ForCausalLM"],"vocab_size":10,"hidden_size":8,
    "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,)";
  ExpectRefused(base + R"("use_sliding_window":true})", "use_sliding_window");
  ExpectRefused(base + R"("rope_scaling":{"rope_type":"yarn","factor":4.0}})", "rope_scaling");
  ExpectRefused(base + R"("rope_parameters":{"rope_type":"llama3"}})", "rope_parameters.rope_type");
  ExpectRefused(base + R"("hidden_act":"gelu"})", "hidden_act");
  ExpectRefused(base + R"("num_key_value_heads":3})", "num_key_value_heads");
  ExpectRefused(base + R"("attention_bias":true})", "attention_bias");
  ExpectRefused(base + R"("layer_types":["full_attention","sliding_attention"]})", "layer_types");
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
}

}  // namespace
}  // namespace lathe::runtime
