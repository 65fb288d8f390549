// Random model folders; see tiny_model.h.
#include "runtime/tiny_model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <fstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "runtime/safetensors.h"
#include "runtime/status.h"

namespace lathe::runtime {
namespace {

nlohmann::json ConfigJson(const TinyModelSpec& s) {
  nlohmann::json j = {
      {"architectures", {s.moe ? "Qwen3MoeForCausalLM" : "Qwen3ForCausalLM"}},
      {"model_type", s.moe ? "qwen3_moe" : "qwen3"},
      {"vocab_size", s.vocab_size},
      {"hidden_size", s.hidden_size},
      {"intermediate_size", s.intermediate_size},
      {"num_hidden_layers", s.num_layers},
      {"num_attention_heads", s.num_heads},
      {"num_key_value_heads", s.num_kv_heads},
      {"head_dim", s.head_dim},
      {"hidden_act", "silu"},
      {"max_position_embeddings", s.max_position_embeddings},
      {"rms_norm_eps", 1e-6},
      {"rope_theta", 1000000.0},
      {"tie_word_embeddings", s.tie_word_embeddings},
      {"attention_bias", s.attention_bias},
      {"torch_dtype", "float32"},
  };
  if (s.moe) {
    j["num_experts"] = s.num_experts;
    j["num_experts_per_tok"] = s.experts_per_token;
    j["moe_intermediate_size"] = s.moe_intermediate_size;
    j["decoder_sparse_step"] = 1;
    j["mlp_only_layers"] = nlohmann::json::array();
    j["norm_topk_prob"] = true;
    j["output_router_logits"] = false;
  }
  return j;
}

}  // namespace

absl::Status WriteTinyModel(const std::string& dir, const TinyModelSpec& s) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(s.seed);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  auto normal = [&](const std::string& name, std::vector<int64_t> shape) {
    tensors.emplace_back(name, at::empty(shape, at::kFloat).normal_(0.0, 0.02, gen));
  };
  auto ones = [&](const std::string& name, int64_t n) { tensors.emplace_back(name, at::ones({n})); };
  const int64_t h = s.hidden_size, q = s.num_heads * s.head_dim, kv = s.num_kv_heads * s.head_dim;
  normal("model.embed_tokens.weight", {s.vocab_size, h});
  for (int64_t i = 0; i < s.num_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    ones(p + "input_layernorm.weight", h);
    ones(p + "post_attention_layernorm.weight", h);
    normal(p + "self_attn.q_proj.weight", {q, h});
    normal(p + "self_attn.k_proj.weight", {kv, h});
    normal(p + "self_attn.v_proj.weight", {kv, h});
    normal(p + "self_attn.o_proj.weight", {h, q});
    if (s.attention_bias) {
      normal(p + "self_attn.q_proj.bias", {q});
      normal(p + "self_attn.k_proj.bias", {kv});
      normal(p + "self_attn.v_proj.bias", {kv});
      normal(p + "self_attn.o_proj.bias", {h});
    }
    ones(p + "self_attn.q_norm.weight", s.head_dim);
    ones(p + "self_attn.k_norm.weight", s.head_dim);
    if (s.moe) {
      normal(p + "mlp.gate.weight", {s.num_experts, h});
      for (int64_t e = 0; e < s.num_experts; ++e) {
        const std::string x = absl::StrCat(p, "mlp.experts.", e, ".");
        normal(x + "gate_proj.weight", {s.moe_intermediate_size, h});
        normal(x + "up_proj.weight", {s.moe_intermediate_size, h});
        normal(x + "down_proj.weight", {h, s.moe_intermediate_size});
      }
    } else {
      normal(p + "mlp.gate_proj.weight", {s.intermediate_size, h});
      normal(p + "mlp.up_proj.weight", {s.intermediate_size, h});
      normal(p + "mlp.down_proj.weight", {h, s.intermediate_size});
    }
  }
  ones("model.norm.weight", h);
  if (!s.tie_word_embeddings) normal("lm_head.weight", {s.vocab_size, h});

  std::vector<TensorToWrite> out;
  for (const auto& [name, t] : tensors) {
    out.push_back({name, "F32", t.sizes().vec(), t.data_ptr(), static_cast<size_t>(t.nbytes())});
  }
  LATHE_RETURN_IF_ERROR(WriteSafetensors(dir + "/model.safetensors", out, {{"format", "pt"}}));
  std::ofstream config(dir + "/config.json");
  config << ConfigJson(s).dump(2) << "\n";
  if (!config) return absl::InternalError(absl::StrCat("cannot write ", dir, "/config.json"));
  return absl::OkStatus();
}

}  // namespace lathe::runtime
