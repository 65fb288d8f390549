// Qwen3.5 / Qwen3.6 config fields, with the defaults of transformers 5.23's
// Qwen3_5TextConfig / Qwen3_5MoeTextConfig where a field is absent.
#include "core/qwen3_5_config.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/status.h"

namespace lathe::runtime {
namespace {

using config_json::Bool;
using config_json::FieldError;
using config_json::Int;
using config_json::json;
using config_json::Real;

// Bounds that keep every product of head counts and widths far from
// int64 overflow; real models use 16-64 heads of 128 and a kernel of 4.
constexpr int64_t kMaxHeads = int64_t{1} << 16;
constexpr int64_t kMaxHeadDim = int64_t{1} << 16;
constexpr int64_t kMaxConvKernel = 64;
constexpr int64_t kMaxLayers = int64_t{1} << 16;  // layer_types is built per layer

absl::StatusOr<int64_t> Bounded(const json& j, const std::string& key, int64_t fallback, int64_t max) {
  LATHE_ASSIGN_OR_RETURN(int64_t v, Int(j, key, fallback));
  if (v < 1 || v > max) return FieldError(key, absl::StrCat("must be between 1 and ", max, " (is ", v, ")"));
  return v;
}

// `layer_types` as given, or the pattern transformers derives from
// full_attention_interval (layer i is full attention when (i + 1) % n == 0).
absl::Status ReadLayerTypes(const json& j, ModelConfig& c) {
  c.layer_types.clear();
  if (c.num_hidden_layers < 1 || c.num_hidden_layers > kMaxLayers) {
    return FieldError("num_hidden_layers", absl::StrCat("must be between 1 and ", kMaxLayers));
  }
  auto types = j.find("layer_types");
  if (types != j.end() && !types->is_null()) {
    if (!types->is_array() || static_cast<int64_t>(types->size()) != c.num_hidden_layers) {
      return FieldError("layer_types", absl::StrCat("must list one type per layer (num_hidden_layers is ",
                                                    c.num_hidden_layers, ")"));
    }
    for (size_t i = 0; i < types->size(); ++i) {
      const json& t = (*types)[i];
      if (t.is_string() && t.get<std::string>() == "linear_attention") {
        c.layer_types.push_back(LayerType::kLinearAttention);
      } else if (t.is_string() && t.get<std::string>() == "full_attention") {
        c.layer_types.push_back(LayerType::kFullAttention);
      } else {
        return FieldError("layer_types", absl::StrCat("entry ", i, " is ", t.dump(),
                                                      "; only \"linear_attention\" and \"full_attention\" exist"));
      }
    }
    return absl::OkStatus();
  }
  LATHE_ASSIGN_OR_RETURN(int64_t interval, Int(j, "full_attention_interval", 4));
  if (interval == 0) return FieldError("full_attention_interval", "must be positive");
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    c.layer_types.push_back((i + 1) % interval == 0 ? LayerType::kFullAttention : LayerType::kLinearAttention);
  }
  return absl::OkStatus();
}

absl::Status ReadLinearAttention(const json& j, ModelConfig& c) {
  LinearAttentionConfig& l = c.linear_attention;
  LATHE_ASSIGN_OR_RETURN(l.num_key_heads, Bounded(j, "linear_num_key_heads", 16, kMaxHeads));
  LATHE_ASSIGN_OR_RETURN(l.num_value_heads, Bounded(j, "linear_num_value_heads", 32, kMaxHeads));
  LATHE_ASSIGN_OR_RETURN(l.key_head_dim, Bounded(j, "linear_key_head_dim", 128, kMaxHeadDim));
  LATHE_ASSIGN_OR_RETURN(l.value_head_dim, Bounded(j, "linear_value_head_dim", 128, kMaxHeadDim));
  LATHE_ASSIGN_OR_RETURN(l.conv_kernel_size, Bounded(j, "linear_conv_kernel_dim", 4, kMaxConvKernel));
  // Each key head serves num_value_heads / num_key_heads value heads.
  if (l.num_value_heads % l.num_key_heads != 0) {
    return FieldError("linear_num_value_heads", absl::StrCat("(", l.num_value_heads,
                                                             ") must be a multiple of linear_num_key_heads (",
                                                             l.num_key_heads, ")"));
  }
  return absl::OkStatus();
}

// partial_rotary_factor and the mRoPE section live in rope_parameters
// (transformers 5) or at the top level (older files); transformers' default
// for Qwen3.5 is 0.25.
absl::Status ReadRotary(const json& j, ModelConfig& c) {
  RotaryConfig& r = c.rotary;
  auto params = j.find("rope_parameters");
  const json empty = json::object();
  const json& p = params != j.end() && params->is_object() ? *params : empty;
  LATHE_ASSIGN_OR_RETURN(double top, Real(j, "partial_rotary_factor", 0.25));
  LATHE_ASSIGN_OR_RETURN(r.partial_rotary_factor, Real(p, "partial_rotary_factor", top));
  if (!(r.partial_rotary_factor > 0.0 && r.partial_rotary_factor <= 1.0)) {
    return FieldError("partial_rotary_factor", "must be in (0, 1]");
  }
  r.rotary_dim = static_cast<int64_t>(static_cast<double>(c.head_dim) * r.partial_rotary_factor);
  if (r.rotary_dim < 2 || r.rotary_dim % 2 != 0) {
    return FieldError("partial_rotary_factor", absl::StrCat("gives ", r.rotary_dim, " rotary dims of head_dim ",
                                                            c.head_dim, "; they must be even and positive"));
  }
  const json* section = nullptr;
  if (auto it = p.find("mrope_section"); it != p.end()) {
    section = &*it;
  } else if (auto top_it = j.find("mrope_section"); top_it != j.end()) {
    section = &*top_it;
  }
  r.mrope_section.clear();
  if (section != nullptr && !section->is_null()) {
    if (!section->is_array()) return FieldError("rope_parameters.mrope_section", "must be a list of integers");
    for (const json& v : *section) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0) {
        return FieldError("rope_parameters.mrope_section", "must be a list of non-negative integers");
      }
      r.mrope_section.push_back(v.get<int64_t>());
    }
  }
  LATHE_ASSIGN_OR_RETURN(r.mrope_interleaved, Bool(p, "mrope_interleaved", false));
  return absl::OkStatus();
}

// Every layer is MoE with a sigmoid-gated shared expert; the router always
// renormalises its top-k (no norm_topk_prob switch).
absl::Status ReadMoeBlock(const json& j, ModelConfig& c) {
  LATHE_ASSIGN_OR_RETURN(c.num_experts, Bounded(j, "num_experts", 256, kMaxHeads));
  LATHE_ASSIGN_OR_RETURN(c.num_experts_per_tok, Int(j, "num_experts_per_tok", 8));
  if (c.num_experts_per_tok == 0 || c.num_experts_per_tok > c.num_experts) {
    return FieldError("num_experts_per_tok", "must be between 1 and num_experts");
  }
  LATHE_ASSIGN_OR_RETURN(c.moe_intermediate_size, Int(j, "moe_intermediate_size", 512));
  if (c.moe_intermediate_size == 0) return FieldError("moe_intermediate_size", "must be positive");
  LATHE_ASSIGN_OR_RETURN(c.shared_expert.intermediate_size, Int(j, "shared_expert_intermediate_size", 512));
  if (c.shared_expert.intermediate_size == 0) return FieldError("shared_expert_intermediate_size", "must be positive");
  c.shared_expert.sigmoid_gate = true;
  c.norm_topk_prob = true;
  c.decoder_sparse_step = 1;
  c.mlp_only_layers.clear();
  return absl::OkStatus();
}

}  // namespace

bool IsQwen3_5(const std::string& a) {
  return a == "Qwen3_5ForCausalLM" || a == "Qwen3_5MoeForCausalLM" || IsQwen3_5Wrapper(a);
}

bool IsQwen3_5Wrapper(const std::string& a) {
  return a == "Qwen3_5ForConditionalGeneration" || a == "Qwen3_5MoeForConditionalGeneration";
}

bool IsQwen3_5Moe(const std::string& a) {
  return a == "Qwen3_5MoeForCausalLM" || a == "Qwen3_5MoeForConditionalGeneration";
}

absl::Status ReadQwen3_5(const json& j, ModelConfig& c) {
  LATHE_RETURN_IF_ERROR(ReadLayerTypes(j, c));
  LATHE_RETURN_IF_ERROR(ReadLinearAttention(j, c));
  LATHE_RETURN_IF_ERROR(ReadRotary(j, c));
  // transformers' Qwen3.5 attention gates its output whatever this says;
  // a file that says otherwise describes a model it would not compute.
  LATHE_ASSIGN_OR_RETURN(c.attn_output_gate, Bool(j, "attn_output_gate", true));
  if (!c.attn_output_gate) return FieldError("attn_output_gate", "is false; Qwen3.5 attention is always gated");
  c.norm_style = NormStyle::kOnePlusWeight;
  if (IsQwen3_5Moe(c.architecture)) {
    LATHE_RETURN_IF_ERROR(ReadMoeBlock(j, c));
  } else if (c.num_experts > 0) {  // ReadMoe took num_experts or num_local_experts
    return FieldError("num_experts", absl::StrCat("is set but ", c.architecture, " is dense"));
  }
  c.checkpoint.weight_prefix = IsQwen3_5Wrapper(c.architecture) ? "model.language_model." : "model.";
  c.checkpoint.lm_head = "lm_head.weight";
  // transformers skips both on load, for the wrapper and the text-only class.
  c.checkpoint.skip_prefixes = {"model.visual.", "mtp."};
  return absl::OkStatus();
}

}  // namespace lathe::runtime
