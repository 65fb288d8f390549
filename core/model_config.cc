// config.json parsing: accepted spellings, defaults, and refusals.
#include "core/model_config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "core/config_json.h"
#include "core/deepseek_v3_config.h"
#include "core/glm_moe_dsa_config.h"
#include "core/quantization.h"
#include "core/qwen3_5_config.h"
#include "core/status.h"

namespace lathe::runtime {
namespace {

using config_json::Bool;
using config_json::FieldError;
using config_json::Int;
using config_json::json;
using config_json::Real;
using config_json::Str;

// The sliding window transformers would apply, refused when some layer's
// window is smaller than the context (max_position_embeddings): a window at
// least that long masks nothing. transformers' defaults: sliding_window 4096
// when the key is absent (null: none). Mistral slides every layer when it has
// a window; Qwen2/Qwen3/Qwen3-MoE only with use_sliding_window, Qwen3-MoE on
// every layer, Qwen2/Qwen3 on the layers layer_types marks (without it, those
// from max_window_layers on, default 28). Llama has no sliding window.
absl::Status CheckSlidingWindow(const json& j, const std::string& architecture) {
  LATHE_ASSIGN_OR_RETURN(const bool use, Bool(j, "use_sliding_window", false));
  LATHE_ASSIGN_OR_RETURN(const int64_t context, Int(j, "max_position_embeddings", 32768));
  LATHE_ASSIGN_OR_RETURN(const int64_t layers, Int(j, "num_hidden_layers", 0));
  if (architecture == "LlamaForCausalLM") return absl::OkStatus();
  const bool mistral = architecture == "MistralForCausalLM";
  const bool per_layer = architecture == "Qwen2ForCausalLM" || architecture == "Qwen3ForCausalLM";
  bool any_sliding = false;
  auto types = j.find("layer_types");  // transformers 5.x
  const bool listed = per_layer && types != j.end() && !types->is_null();
  if (listed) {
    if (!types->is_array()) return FieldError("layer_types", "must be a list of layer types");
    for (const auto& t : *types) {
      const std::string type = t.is_string() ? t.get<std::string>() : "";
      if (type == "sliding_attention") {
        any_sliding = true;
      } else if (type != "full_attention") {
        return FieldError("layer_types", "lists a layer that is neither \"full_attention\" nor \"sliding_attention\"");
      }
    }
  }
  int64_t window = 4096;
  auto it = j.find("sliding_window");
  if (it != j.end()) {
    if (it->is_null()) {
      window = 0;
    } else if (!it->is_number_integer() || it->get<int64_t>() <= 0) {
      return FieldError("sliding_window", "must be a positive integer or null");
    } else {
      window = it->get<int64_t>();
    }
  }
  if (!mistral && !use) window = 0;
  if (window == 0) return absl::OkStatus();  // every layer attends to its whole context
  if (!listed) {
    LATHE_ASSIGN_OR_RETURN(const int64_t first, Int(j, "max_window_layers", 28));
    any_sliding = !per_layer || first < layers;
  }
  if (any_sliding && window < context) {
    return FieldError(mistral ? "sliding_window" : "use_sliding_window",
                      absl::StrCat(mistral ? "is " : "is true with sliding_window ", window,
                                   ", smaller than max_position_embeddings ", context,
                                   "; sliding-window attention is not supported"));
  }
  return absl::OkStatus();
}

// Features whose presence changes the math; refused rather than ignored.
absl::Status RefuseUnsupported(const json& j, const ModelConfig& c) {
  LATHE_RETURN_IF_ERROR(CheckSlidingWindow(j, c.architecture));
  LATHE_ASSIGN_OR_RETURN(bool mlp_bias, Bool(j, "mlp_bias", false));
  if (mlp_bias) return FieldError("mlp_bias", "is true; MLP biases are not supported");
  auto act = j.find("hidden_act");
  if (act != j.end() && !(act->is_string() && act->get<std::string>() == "silu")) {
    return FieldError("hidden_act", "must be \"silu\"");
  }
  LATHE_ASSIGN_OR_RETURN(bool router_logits, Bool(j, "output_router_logits", false));
  if (router_logits) {
    return FieldError("output_router_logits", "is true; the router auxiliary loss is not supported");
  }
  return absl::OkStatus();
}

// A positive finite number no larger than `max`, named `field` in errors.
absl::StatusOr<double> Bounded(const json& j, const std::string& key, const std::string& field, double fallback,
                               double min_exclusive, double max) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number()) return FieldError(field, "must be a number");
  const double v = it->get<double>();
  if (!std::isfinite(v) || v <= min_exclusive || v > max) {
    return FieldError(field, absl::StrCat("is ", v, "; it must be finite, greater than ", min_exclusive,
                                          " and at most ", max));
  }
  return v;
}

constexpr double kMaxRopeFactor = 1024.0;
constexpr double kMaxRopeTheta = 1e12;

// Where the rope settings come from: the rope object `p` of config.json `j`,
// named `where` in errors.
struct RopeJson {
  const json& j;
  const json& p;
  std::string where;
  bool partial_rotary = false;  // partial_rotary_factor read elsewhere (Qwen3.5)
  std::string Field(const std::string& key) const { return absl::StrCat(where, ".", key); }
  absl::Status Require(const char* key, const std::string& type) const {
    if (p.contains(key)) return absl::OkStatus();
    return FieldError(Field(key), absl::StrCat("is required for rope type \"", type, "\""));
  }
};

// The type, theta and the factor; partial rotary embeddings refused.
absl::Status ReadRopeCommon(const RopeJson& s, RopeSettings& r) {
  LATHE_ASSIGN_OR_RETURN(const std::string legacy, Str(s.p, "type", "default"));
  LATHE_ASSIGN_OR_RETURN(r.type, Str(s.p, "rope_type", legacy));
  if (r.type != "default" && r.type != "linear" && r.type != "llama3" && r.type != "yarn") {
    return FieldError(s.Field(s.p.contains("rope_type") ? "rope_type" : "type"),
                      absl::StrCat("is \"", r.type, "\"; supported rope types: default, linear, llama3, yarn"));
  }
  LATHE_ASSIGN_OR_RETURN(const double top, Bounded(s.j, "rope_theta", "rope_theta", 10000.0, 1.0, kMaxRopeTheta));
  LATHE_ASSIGN_OR_RETURN(r.theta, Bounded(s.p, "rope_theta", s.Field("rope_theta"), top, 1.0, kMaxRopeTheta));
  for (const json* source : {&s.j, &s.p}) {
    if (s.partial_rotary) break;
    LATHE_ASSIGN_OR_RETURN(const double partial, Real(*source, "partial_rotary_factor", 1.0));
    if (partial != 1.0) {
      return FieldError(source == &s.j ? "partial_rotary_factor" : s.Field("partial_rotary_factor"),
                        "is not 1; partial rotary embeddings are not supported");
    }
  }
  if (r.type == "default") return absl::OkStatus();
  LATHE_RETURN_IF_ERROR(s.Require("factor", r.type));
  if (r.type == "yarn" && s.p["factor"].is_null()) return absl::OkStatus();  // derived in ReadYarn
  if (s.p["factor"].is_null()) return FieldError(s.Field("factor"), "must be a number");
  LATHE_ASSIGN_OR_RETURN(r.factor, Bounded(s.p, "factor", s.Field("factor"), 1.0, 0.0, kMaxRopeFactor));
  if (r.factor < 1.0) return FieldError(s.Field("factor"), absl::StrCat("is ", r.factor, "; it must be at least 1"));
  return absl::OkStatus();
}

// transformers: a top-level original_max_position_embeddings wins, then the
// rope settings', then max_position_embeddings.
absl::Status ReadOriginalContext(const RopeJson& s, int64_t max_position_embeddings, RopeSettings& r) {
  auto it = s.j.find("original_max_position_embeddings");
  const bool top = it != s.j.end() && !it->is_null();
  const std::string field = top ? "original_max_position_embeddings" : s.Field("original_max_position_embeddings");
  if (top) {
    LATHE_ASSIGN_OR_RETURN(r.original_max_position_embeddings, Int(s.j, "original_max_position_embeddings"));
  } else {
    LATHE_ASSIGN_OR_RETURN(r.original_max_position_embeddings,
                           Int(s.p, "original_max_position_embeddings", max_position_embeddings));
  }
  if (r.original_max_position_embeddings == 0) return FieldError(field, "must be positive");
  return absl::OkStatus();
}

absl::Status ReadLlama3(const RopeJson& s, RopeSettings& r) {
  LATHE_RETURN_IF_ERROR(s.Require("low_freq_factor", r.type));
  LATHE_RETURN_IF_ERROR(s.Require("high_freq_factor", r.type));
  LATHE_ASSIGN_OR_RETURN(r.low_freq_factor,
                         Bounded(s.p, "low_freq_factor", s.Field("low_freq_factor"), 0.0, 0.0, kMaxRopeFactor));
  LATHE_ASSIGN_OR_RETURN(r.high_freq_factor,
                         Bounded(s.p, "high_freq_factor", s.Field("high_freq_factor"), 0.0, 0.0, kMaxRopeFactor));
  if (r.low_freq_factor <= 0.0) return FieldError(s.Field("low_freq_factor"), "must be a positive number");
  if (r.high_freq_factor <= r.low_freq_factor) {
    return FieldError(s.Field("high_freq_factor"), absl::StrCat("is ", r.high_freq_factor,
                                                                "; it must be greater than low_freq_factor ",
                                                                r.low_freq_factor));
  }
  return absl::OkStatus();
}

// yarn's cos/sin factor: attention_factor, else from factor and mscale /
// mscale_all_dim as transformers derives it.
absl::Status ReadYarnAttentionFactor(const RopeJson& s, RopeSettings& r) {
  if (s.p.contains("attention_factor") && !s.p["attention_factor"].is_null()) {
    LATHE_ASSIGN_OR_RETURN(r.attention_factor,
                           Bounded(s.p, "attention_factor", s.Field("attention_factor"), 1.0, 0.0, 1e3));
    return absl::OkStatus();
  }
  auto mscale = [](double scale, double m) { return scale <= 1.0 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
  LATHE_ASSIGN_OR_RETURN(const double m, Bounded(s.p, "mscale", s.Field("mscale"), 0.0, -1e6, 1e6));
  LATHE_ASSIGN_OR_RETURN(const double all, Bounded(s.p, "mscale_all_dim", s.Field("mscale_all_dim"), 0.0, -1e6, 1e6));
  r.attention_factor = (m != 0.0 && all != 0.0) ? mscale(r.factor, m) / mscale(r.factor, all) : mscale(r.factor, 1.0);
  if (!std::isfinite(r.attention_factor) || r.attention_factor <= 0.0) {
    return FieldError(s.Field("mscale"), "gives an attention factor that is not a positive number");
  }
  return absl::OkStatus();
}

absl::Status ReadYarn(const RopeJson& s, int64_t max_position_embeddings, RopeSettings& r) {
  if (s.p["factor"].is_null()) {
    r.factor = static_cast<double>(max_position_embeddings) / static_cast<double>(r.original_max_position_embeddings);
    if (!(r.factor >= 1.0 && r.factor <= kMaxRopeFactor)) {
      return FieldError(s.Field("factor"), "is null and max_position_embeddings / original_max_position_embeddings "
                                           "is not between 1 and 1024");
    }
  }
  // transformers reads "beta_fast or 32": null and 0 take the defaults.
  LATHE_ASSIGN_OR_RETURN(r.beta_fast, Bounded(s.p, "beta_fast", s.Field("beta_fast"), 32.0, -1e6, 1e6));
  LATHE_ASSIGN_OR_RETURN(r.beta_slow, Bounded(s.p, "beta_slow", s.Field("beta_slow"), 1.0, -1e6, 1e6));
  if (r.beta_fast == 0.0) r.beta_fast = 32.0;
  if (r.beta_slow == 0.0) r.beta_slow = 1.0;
  if (r.beta_fast <= 0.0 || r.beta_slow <= 0.0) {
    return FieldError(s.Field("beta_fast"), "and beta_slow must be positive");
  }
  if (r.beta_fast < r.beta_slow) {
    return FieldError(s.Field("beta_fast"), absl::StrCat("is ", r.beta_fast, "; it must not be less than beta_slow ",
                                                         r.beta_slow));
  }
  LATHE_ASSIGN_OR_RETURN(r.truncate, Bool(s.p, "truncate", true));
  return ReadYarnAttentionFactor(s, r);
}

// The RoPE settings as transformers standardises them: rope_scaling (4.x)
// when it is a non-empty object, else rope_parameters (5.x); rope_theta
// inside them, else at the top level, else 10000.
absl::Status ReadRope(const json& j, ModelConfig& c) {
  static const json kEmpty = json::object();
  const json* params = &kEmpty;
  std::string where = "rope_parameters";
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) continue;
    if (!it->is_object()) return FieldError(key, "must be an object");
    if (std::string(key) == "rope_scaling" && it->empty()) continue;
    params = &*it;
    where = key;
  }
  const RopeJson s{j, *params, where, IsQwen3_5(c.architecture)};
  RopeSettings& r = c.rope;
  LATHE_RETURN_IF_ERROR(ReadRopeCommon(s, r));
  c.rope_theta = r.theta;
  if (r.type == "default" || r.type == "linear") return absl::OkStatus();
  LATHE_RETURN_IF_ERROR(ReadOriginalContext(s, c.max_position_embeddings, r));
  return r.type == "llama3" ? ReadLlama3(s, r) : ReadYarn(s, c.max_position_embeddings, r);
}

absl::Status ReadArchitecture(const json& j, ModelConfig& c) {
  static const char* kSupported[] = {"Qwen3ForCausalLM",
                                     "Qwen3MoeForCausalLM",
                                     "Qwen2ForCausalLM",
                                     "LlamaForCausalLM",
                                     "MistralForCausalLM",
                                     "Qwen3_5ForCausalLM",
                                     "Qwen3_5MoeForCausalLM",
                                     "Qwen3_5ForConditionalGeneration",
                                     "Qwen3_5MoeForConditionalGeneration",
                                     "DeepseekV3ForCausalLM",
                                     "KimiK25ForConditionalGeneration",
                                     "Kimi_K25ForConditionalGeneration",
                                     "GlmMoeDsaForCausalLM"};
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

// Qwen2 always has q/k/v biases; Llama and Qwen3 have q/k/v/o biases with
// attention_bias; Mistral never has any (its attention ignores the field).
absl::Status ReadAttentionBias(const json& j, ModelConfig& c) {
  LATHE_ASSIGN_OR_RETURN(const bool attention_bias, Bool(j, "attention_bias", false));
  if (IsQwen3_5(c.architecture)) {
    if (attention_bias) return FieldError("attention_bias", "is true; Qwen3.5 attention biases are not supported");
  } else if (c.architecture == "Qwen2ForCausalLM") {
    c.qkv_bias = true;
  } else if (c.architecture != "MistralForCausalLM") {
    c.qkv_bias = c.o_bias = attention_bias;
  }
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
  LATHE_RETURN_IF_ERROR(ReadRope(j, c));
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
  if (IsDeepseekV3(c.architecture)) return absl::OkStatus();  // ReadDeepseekV3 (n_routed_experts)
  if (IsGlmMoeDsa(c.architecture)) return absl::OkStatus();   // ReadGlmMoeDsa
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
  LATHE_RETURN_IF_ERROR(RefuseUnsupported(j, c));
  LATHE_RETURN_IF_ERROR(ReadAttentionBias(j, c));
  LATHE_RETURN_IF_ERROR(ReadDense(j, c));
  LATHE_RETURN_IF_ERROR(ReadMoe(j, c));
  if (qwen3_5) LATHE_RETURN_IF_ERROR(ReadQwen3_5(j, c));
  if (IsDeepseekV3(c.architecture)) LATHE_RETURN_IF_ERROR(ReadDeepseekV3(j, c));
  if (IsGlmMoeDsa(c.architecture)) LATHE_RETURN_IF_ERROR(ReadGlmMoeDsa(j, c));
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
  // Refused here so that a run fails before loading anything; the weight
  // reader (runtime/weight_source.h) reads it again where it dequantizes.
  // At the top level or under a wrapper's text_config.
  LATHE_RETURN_IF_ERROR(ReadCheckpointQuantization(json_text).status());
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
  if (IsKimiK25(c.architecture)) {
    // transformers' Kimi_K25Config ties by its own flag, which defaults to
    // true: a wrapper config without it has lm_head tied to the embedding.
    auto text = j.find("text_config");
    if (text == j.end() || !text->is_object()) return FieldError("text_config", "must be an object");
    LATHE_RETURN_IF_ERROR(ReadText(*text, false, c));
    LATHE_ASSIGN_OR_RETURN(c.tie_word_embeddings, Bool(j, "tie_word_embeddings", true));
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
