// DeepSeek-V3 config fields, with the defaults of transformers 5.23's
// DeepseekV3Config where a field is absent.
#include "core/deepseek_v3_config.h"

#include <algorithm>
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
using config_json::Str;

// Far beyond real models (64-128 heads, ranks 512-2048, 384 experts) and far
// from int64 overflow in any product of them.
constexpr int64_t kMaxDim = int64_t{1} << 20;

absl::StatusOr<int64_t> Bounded(const json& j, const std::string& key, int64_t fallback, int64_t min) {
  LATHE_ASSIGN_OR_RETURN(int64_t v, Int(j, key, fallback));
  if (v < min || v > kMaxDim) {
    return FieldError(key, absl::StrCat("must be between ", min, " and ", kMaxDim, " (is ", v, ")"));
  }
  return v;
}

// The rope object ReadRope took: rope_scaling when a non-empty object, else
// rope_parameters.
const json& RopeObject(const json& j) {
  static const json kEmpty = json::object();
  const json* params = &kEmpty;
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    auto it = j.find(key);
    if (it == j.end() || !it->is_object() || it->empty()) continue;
    params = &*it;
  }
  return *params;
}

// transformers' yarn_apply_mscale: with a scaled rope and a non-zero
// mscale_all_dim m, the softmax scale is multiplied by (0.1·m·ln(factor) + 1)²
// (1 when factor ≤ 1).
absl::Status ReadSoftmaxScale(const json& j, ModelConfig& c) {
  LatentAttentionConfig& a = c.latent_attention;
  a.softmax_scale = 1.0 / std::sqrt(static_cast<double>(a.qk_head_dim()));
  if (c.rope.type == "default") return absl::OkStatus();
  LATHE_ASSIGN_OR_RETURN(const double all, Real(RopeObject(j), "mscale_all_dim", 0.0));
  if (!std::isfinite(all)) return FieldError("rope_parameters.mscale_all_dim", "must be finite");
  if (all == 0.0 || c.rope.factor <= 1.0) return absl::OkStatus();
  const double m = 0.1 * all * std::log(c.rope.factor) + 1.0;
  a.softmax_scale *= m * m;
  return absl::OkStatus();
}

absl::Status ReadLatentAttention(const json& j, ModelConfig& c) {
  LatentAttentionConfig& a = c.latent_attention;
  LATHE_ASSIGN_OR_RETURN(a.q_lora_rank, Bounded(j, "q_lora_rank", 1536, 0));  // null: q_proj
  if (j.contains("q_lora_rank") && j["q_lora_rank"].is_null()) a.q_lora_rank = 0;
  LATHE_ASSIGN_OR_RETURN(a.kv_lora_rank, Bounded(j, "kv_lora_rank", 512, 1));
  LATHE_ASSIGN_OR_RETURN(a.qk_nope_head_dim, Bounded(j, "qk_nope_head_dim", 128, 1));
  LATHE_ASSIGN_OR_RETURN(a.qk_rope_head_dim, Bounded(j, "qk_rope_head_dim", 64, 2));
  LATHE_ASSIGN_OR_RETURN(a.v_head_dim, Bounded(j, "v_head_dim", 128, 1));
  if (a.qk_rope_head_dim % 2 != 0) return FieldError("qk_rope_head_dim", "must be even");
  LATHE_ASSIGN_OR_RETURN(a.rope_interleave, Bool(j, "rope_interleave", true));
  // transformers' attention takes num_heads keys from kv_b_proj and repeats
  // them num_attention_heads / num_key_value_heads times: only 1 computes.
  if (c.num_key_value_heads != c.num_attention_heads) {
    return FieldError("num_key_value_heads", absl::StrCat("is ", c.num_key_value_heads,
                                                          "; latent attention needs it equal to num_attention_heads (",
                                                          c.num_attention_heads, ")"));
  }
  LATHE_ASSIGN_OR_RETURN(const bool bias, Bool(j, "attention_bias", false));
  if (bias) return FieldError("attention_bias", "is true; latent attention biases are not supported");
  c.qkv_bias = c.o_bias = false;
  c.head_dim = a.qk_head_dim();
  c.rotary.rotary_dim = a.qk_rope_head_dim;  // the rope tables' width
  return ReadSoftmaxScale(j, c);
}

// Keys of DeepSeek's own configs that transformers ignores; a value other
// than V3's would describe a model transformers computes differently.
absl::Status RefuseOtherRouting(const json& j) {
  LATHE_ASSIGN_OR_RETURN(const std::string scoring, Str(j, "scoring_func", "sigmoid"));
  if (scoring != "sigmoid") {
    return FieldError("scoring_func", absl::StrCat("is \"", scoring, "\"; DeepSeek-V3 routing scores by sigmoid"));
  }
  LATHE_ASSIGN_OR_RETURN(const std::string method, Str(j, "topk_method", "noaux_tc"));
  if (method != "noaux_tc") {
    return FieldError("topk_method", absl::StrCat("is \"", method, "\"; DeepSeek-V3 routing is \"noaux_tc\""));
  }
  return absl::OkStatus();
}

absl::Status ReadRouter(const json& j, ModelConfig& c) {
  LATHE_RETURN_IF_ERROR(RefuseOtherRouting(j));
  SigmoidRouterConfig& r = c.sigmoid_router;
  r.enabled = true;
  LATHE_ASSIGN_OR_RETURN(c.num_experts, Bounded(j, "n_routed_experts", 256, 1));
  LATHE_ASSIGN_OR_RETURN(c.num_experts_per_tok, Bounded(j, "num_experts_per_tok", 8, 1));
  LATHE_ASSIGN_OR_RETURN(c.moe_intermediate_size, Bounded(j, "moe_intermediate_size", 2048, 1));
  LATHE_ASSIGN_OR_RETURN(r.n_group, Bounded(j, "n_group", 8, 1));
  LATHE_ASSIGN_OR_RETURN(r.topk_group, Bounded(j, "topk_group", 4, 1));
  LATHE_ASSIGN_OR_RETURN(c.norm_topk_prob, Bool(j, "norm_topk_prob", true));
  LATHE_ASSIGN_OR_RETURN(r.routed_scaling_factor, Real(j, "routed_scaling_factor", 2.5));
  if (!std::isfinite(r.routed_scaling_factor) || r.routed_scaling_factor <= 0.0) {
    return FieldError("routed_scaling_factor", "must be a positive number");
  }
  if (c.num_experts % r.n_group != 0) {
    return FieldError("n_group", absl::StrCat("(", r.n_group, ") must divide n_routed_experts (", c.num_experts, ")"));
  }
  const int64_t per_group = c.num_experts / r.n_group;
  // A group's score is the sum of its two best experts.
  if (per_group < 2) return FieldError("n_group", "leaves fewer than 2 experts per group");
  if (r.topk_group > r.n_group) return FieldError("topk_group", absl::StrCat("must be at most n_group (", r.n_group, ")"));
  if (c.num_experts_per_tok > r.topk_group * per_group) {
    return FieldError("num_experts_per_tok", absl::StrCat("(", c.num_experts_per_tok, ") exceeds the ",
                                                          r.topk_group * per_group, " experts of topk_group groups"));
  }
  LATHE_ASSIGN_OR_RETURN(const int64_t shared, Bounded(j, "n_shared_experts", 1, 0));
  c.shared_expert.intermediate_size = shared * c.moe_intermediate_size;
  c.shared_expert.sigmoid_gate = false;
  return absl::OkStatus();
}

// The first first_k_dense_replace layers have the dense MLP, the rest MoE.
absl::Status ReadDenseLayers(const json& j, ModelConfig& c) {
  LATHE_ASSIGN_OR_RETURN(const int64_t dense, Int(j, "first_k_dense_replace", 3));
  c.decoder_sparse_step = 1;
  c.mlp_only_layers.clear();
  for (int64_t i = 0; i < std::min(dense, c.num_hidden_layers); ++i) c.mlp_only_layers.push_back(i);
  if (dense > 0 && c.intermediate_size == 0) return FieldError("intermediate_size", "must be positive");
  return absl::OkStatus();
}

}  // namespace

bool IsDeepseekV3(const std::string& a) { return a == "DeepseekV3ForCausalLM" || IsKimiK25(a); }

bool IsKimiK25(const std::string& a) {
  return a == "KimiK25ForConditionalGeneration" || a == "Kimi_K25ForConditionalGeneration";
}

absl::Status ReadDeepseekV3(const json& j, ModelConfig& c) {
  if (c.num_hidden_layers < 1 || c.num_hidden_layers > kMaxDim) {
    return FieldError("num_hidden_layers", absl::StrCat("must be between 1 and ", kMaxDim));
  }
  LATHE_RETURN_IF_ERROR(ReadLatentAttention(j, c));
  LATHE_RETURN_IF_ERROR(ReadRouter(j, c));
  LATHE_RETURN_IF_ERROR(ReadDenseLayers(j, c));
  const bool kimi = IsKimiK25(c.architecture);
  if (kimi) {
    LATHE_ASSIGN_OR_RETURN(const std::string type, Str(j, "model_type", "deepseek_v3"));
    if (type != "kimi_k2" && type != "deepseek_v3") {
      return FieldError("text_config.model_type", absl::StrCat("is \"", type, "\"; expected \"kimi_k2\""));
    }
  }
  c.checkpoint.weight_prefix = kimi ? "language_model.model." : "model.";
  c.checkpoint.lm_head = kimi ? "language_model.lm_head.weight" : "lm_head.weight";
  // The multi-token-prediction layer sits after the last decoder layer;
  // transformers skips it on load (and the wrapper's vision tower).
  c.checkpoint.skip_prefixes = {absl::StrCat(c.checkpoint.weight_prefix, "layers.", c.num_hidden_layers, ".")};
  if (kimi) c.checkpoint.skip_prefixes.insert(c.checkpoint.skip_prefixes.end(), {"vision_tower.", "mm_projector."});
  return absl::OkStatus();
}

}  // namespace lathe::runtime
