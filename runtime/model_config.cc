// config.json parsing: accepted spellings, defaults, and refusals.
#include "runtime/model_config.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "runtime/config_json.h"
#include "runtime/qwen3_5_config.h"
#include "runtime/status.h"

namespace lathe::runtime {
namespace {

using config_json::Bool;
using config_json::FieldError;
using config_json::Int;
using config_json::json;
using config_json::Real;
using config_json::Str;

// Features whose presence changes the math; refused rather than ignored.
// `hybrid`: Qwen3.5's linear_attention layers are read by ReadQwen3_5.
absl::Status RefuseUnsupported(const json& j, bool hybrid) {
  LATHE_ASSIGN_OR_RETURN(bool sliding, Bool(j, "use_sliding_window", false));
  if (sliding) return FieldError("use_sliding_window", "is true; sliding-window attention is not supported");
  auto types = j.find("layer_types");  // transformers 5.x
  if (!hybrid && types != j.end() && types->is_array()) {
    for (const auto& t : *types) {
      if (!t.is_string() || t.get<std::string>() != "full_attention") {
        return FieldError("layer_types", "lists a layer that is not \"full_attention\"");
      }
    }
  }
  auto window = j.find("sliding_window");
  LATHE_ASSIGN_OR_RETURN(const std::string model_type, Str(j, "model_type", ""));
  if (window != j.end() && !window->is_null() && model_type == "mistral") {
    return FieldError("sliding_window", "is set; sliding-window attention is not supported");
  }
  LATHE_ASSIGN_OR_RETURN(bool attn_bias, Bool(j, "attention_bias", false));
  if (attn_bias) return FieldError("attention_bias", "is true; attention biases are not supported");
  LATHE_ASSIGN_OR_RETURN(bool mlp_bias, Bool(j, "mlp_bias", false));
  if (mlp_bias) return FieldError("mlp_bias", "is true; MLP biases are not supported");
  auto act = j.find("hidden_act");
  if (act != j.end() && !(act->is_string() && act->get<std::string>() == "silu")) {
    return FieldError("hidden_act", "must be \"silu\"");
  }
  auto scaling = j.find("rope_scaling");
  if (scaling != j.end() && !scaling->is_null()) {
    std::string type;
    if (scaling->is_object()) {
      LATHE_ASSIGN_OR_RETURN(const std::string legacy, Str(*scaling, "type", ""));
      LATHE_ASSIGN_OR_RETURN(type, Str(*scaling, "rope_type", legacy));
    }
    if (type != "default") return FieldError("rope_scaling", "is set; only default RoPE is supported");
  }
  auto params = j.find("rope_parameters");
  if (params != j.end() && params->is_object()) {
    LATHE_ASSIGN_OR_RETURN(const std::string type, Str(*params, "rope_type", "default"));
    if (type != "default") {
      return FieldError("rope_parameters.rope_type", absl::StrCat("is \"", type, "\"; only default RoPE is supported"));
    }
  }
  LATHE_ASSIGN_OR_RETURN(bool router_logits, Bool(j, "output_router_logits", false));
  if (router_logits) {
    return FieldError("output_router_logits", "is true; the router auxiliary loss is not supported");
  }
  return absl::OkStatus();
}

absl::Status ReadArchitecture(const json& j, ModelConfig& c) {
  static const char* kSupported[] = {"Qwen3ForCausalLM",
                                     "Qwen3MoeForCausalLM",
                                     "LlamaForCausalLM",
                                     "MistralForCausalLM",
                                     "Qwen3_5ForCausalLM",
                                     "Qwen3_5MoeForCausalLM",
                                     "Qwen3_5ForConditionalGeneration",
                                     "Qwen3_5MoeForConditionalGeneration"};
  auto arch = j.find("architectures");
  if (arch == j.end() || !arch->is_array() || arch->size() != 1 || !(*arch)[0].is_string()) {
    return FieldError("architectures", "must be a list of one architecture name");
  }
  c.architecture = (*arch)[0].get<std::string>();
  if (std::find(std::begin(kSupported), std::end(kSupported), c.architecture) == std::end(kSupported)) {
    return FieldError("architectures", absl::StrCat("names unsupported architecture '", c.architecture,
                                                    "' (supported: ", absl::StrJoin(kSupported, ", "), ")"));
  }
  LATHE_ASSIGN_OR_RETURN(c.model_type, Str(j, "model_type", ""));
  c.qk_norm = c.architecture.rfind("Qwen3", 0) == 0;
  return absl::OkStatus();
}

void ReadDtype(const json& j, ModelConfig& c) {
  auto dtype = j.contains("dtype") ? j.find("dtype") : j.find("torch_dtype");
  if (dtype != j.end() && dtype->is_string()) c.dtype = dtype->get<std::string>();
}

absl::Status ReadDense(const json& j, ModelConfig& c) {
  LATHE_ASSIGN_OR_RETURN(c.vocab_size, Int(j, "vocab_size"));
  LATHE_ASSIGN_OR_RETURN(c.hidden_size, Int(j, "hidden_size"));
  // Qwen3.5-MoE has no dense MLP and no intermediate_size.
  LATHE_ASSIGN_OR_RETURN(c.intermediate_size, Int(j, "intermediate_size", IsQwen3_5Moe(c.architecture) ? 0 : -1));
  LATHE_ASSIGN_OR_RETURN(c.num_hidden_layers, Int(j, "num_hidden_layers"));
  LATHE_ASSIGN_OR_RETURN(c.num_attention_heads, Int(j, "num_attention_heads"));
  LATHE_ASSIGN_OR_RETURN(c.num_key_value_heads, Int(j, "num_key_value_heads", c.num_attention_heads));
  if (c.num_attention_heads == 0) return FieldError("num_attention_heads", "must be positive");
  const int64_t default_head_dim = IsQwen3_5(c.architecture) ? 256 : c.hidden_size / c.num_attention_heads;
  LATHE_ASSIGN_OR_RETURN(c.head_dim, Int(j, "head_dim", default_head_dim));
  LATHE_ASSIGN_OR_RETURN(c.max_position_embeddings, Int(j, "max_position_embeddings", 32768));
  LATHE_ASSIGN_OR_RETURN(c.rms_norm_eps, Real(j, "rms_norm_eps", 1e-6));
  LATHE_ASSIGN_OR_RETURN(c.tie_word_embeddings, Bool(j, "tie_word_embeddings", false));
  double theta = 10000.0;
  auto params = j.find("rope_parameters");  // transformers 5.x
  if (params != j.end() && params->is_object()) {
    LATHE_ASSIGN_OR_RETURN(theta, Real(*params, "rope_theta", theta));
  }
  LATHE_ASSIGN_OR_RETURN(c.rope_theta, Real(j, "rope_theta", theta));
  ReadDtype(j, c);
  if (c.num_key_value_heads == 0 || c.num_attention_heads % c.num_key_value_heads != 0) {
    return FieldError("num_key_value_heads", "must divide num_attention_heads");
  }
  if (c.head_dim == 0 || c.head_dim % 2 != 0) return FieldError("head_dim", "must be positive and even");
  c.rotary.rotary_dim = c.head_dim;  // whole heads unless ReadQwen3_5 reads a partial factor
  if (c.vocab_size == 0 || c.hidden_size == 0) return FieldError("hidden_size", "must be positive");
  return absl::OkStatus();
}

absl::Status ReadMoe(const json& j, ModelConfig& c) {
  int64_t experts = 0;
  for (const char* key : {"num_experts", "num_local_experts"}) {
    LATHE_ASSIGN_OR_RETURN(int64_t v, Int(j, key, 0));
    if (v > 0) experts = v;
  }
  c.num_experts = experts;
  if (IsQwen3_5(c.architecture)) return absl::OkStatus();  // ReadQwen3_5
  if (c.architecture != "Qwen3MoeForCausalLM") {
    if (experts > 0) return FieldError("num_experts", absl::StrCat("is set but ", c.architecture, " is dense"));
    return absl::OkStatus();
  }
  LATHE_ASSIGN_OR_RETURN(c.num_experts_per_tok, Int(j, "num_experts_per_tok"));
  LATHE_ASSIGN_OR_RETURN(c.moe_intermediate_size, Int(j, "moe_intermediate_size"));
  LATHE_ASSIGN_OR_RETURN(c.decoder_sparse_step, Int(j, "decoder_sparse_step", 1));
  LATHE_ASSIGN_OR_RETURN(c.norm_topk_prob, Bool(j, "norm_topk_prob", false));
  auto only = j.find("mlp_only_layers");
  if (only != j.end() && !only->is_null()) {
    if (!only->is_array()) return FieldError("mlp_only_layers", "must be a list of layer indices");
    for (const auto& v : *only) {
      if (!v.is_number_integer()) return FieldError("mlp_only_layers", "must be a list of layer indices");
      c.mlp_only_layers.push_back(v.get<int64_t>());
    }
  }
  if (c.num_experts_per_tok == 0 || c.num_experts_per_tok > c.num_experts) {
    return FieldError("num_experts_per_tok", "must be between 1 and num_experts");
  }
  if (c.decoder_sparse_step == 0) return FieldError("decoder_sparse_step", "must be positive");
  return absl::OkStatus();
}

absl::Status ReadText(const json& j, bool qwen3_5, ModelConfig& c) {
  LATHE_RETURN_IF_ERROR(RefuseUnsupported(j, qwen3_5));
  LATHE_RETURN_IF_ERROR(ReadDense(j, c));
  LATHE_RETURN_IF_ERROR(ReadMoe(j, c));
  if (qwen3_5) LATHE_RETURN_IF_ERROR(ReadQwen3_5(j, c));
  return absl::OkStatus();
}

}  // namespace

bool ModelConfig::IsMoeLayer(int64_t layer) const {
  if (num_experts == 0) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) return false;
  return (layer + 1) % decoder_sparse_step == 0;
}

bool ModelConfig::IsLinearAttentionLayer(int64_t layer) const {
  return layer >= 0 && layer < static_cast<int64_t>(layer_types.size()) &&
         layer_types[layer] == LayerType::kLinearAttention;
}

bool ModelConfig::IsHybrid() const {
  return std::find(layer_types.begin(), layer_types.end(), LayerType::kLinearAttention) != layer_types.end();
}

bool ModelConfig::HasDenseMlp() const {
  for (int64_t i = 0; i < num_hidden_layers; ++i) {
    if (!IsMoeLayer(i)) return true;
  }
  return false;
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("config.json: not a JSON object");
  }
  ModelConfig c;
  LATHE_RETURN_IF_ERROR(ReadArchitecture(j, c));
  const bool qwen3_5 = IsQwen3_5(c.architecture);
  // The multimodal wrappers keep the text model's fields under text_config;
  // tie_word_embeddings stays at the top (transformers ties lm_head by the
  // top-level flag and ignores text_config's).
  if (IsQwen3_5Wrapper(c.architecture)) {
    auto text = j.find("text_config");
    if (text == j.end() || !text->is_object()) return FieldError("text_config", "must be an object");
    LATHE_RETURN_IF_ERROR(ReadText(*text, qwen3_5, c));
    LATHE_ASSIGN_OR_RETURN(c.tie_word_embeddings, Bool(j, "tie_word_embeddings", false));
    if (c.dtype == "float32" && !text->contains("dtype") && !text->contains("torch_dtype")) ReadDtype(j, c);
    return c;
  }
  LATHE_RETURN_IF_ERROR(ReadText(j, qwen3_5, c));
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir) {
  std::string path = dir + "/config.json";
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  auto config = ParseModelConfig(ss.str());
  if (!config.ok()) {
    // The parser names the file "config.json"; name the path instead, once.
    absl::string_view why = config.status().message();
    absl::ConsumePrefix(&why, "config.json: ");
    return absl::Status(config.status().code(), absl::StrCat(path, ": ", why));
  }
  return config;
}

}  // namespace lathe::runtime
