// GLM-5 config fields, with the defaults of transformers 5.23's
// GlmMoeDsaConfig where a field is absent.
#include "core/glm_moe_dsa_config.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/deepseek_v3_config.h"
#include "core/status.h"

namespace lathe::runtime {
namespace {

using config_json::FieldError;
using config_json::Int;
using config_json::json;

constexpr int64_t kMaxDim = int64_t{1} << 20;

// GlmMoeDsaConfig's defaults for the fields ReadDeepseekV3 reads with
// DeepseekV3Config's.
json WithGlmDefaults(const json& j) {
  static const json kDefaults = {
      {"q_lora_rank", 2048},       {"kv_lora_rank", 512},           {"qk_nope_head_dim", 192},
      {"qk_rope_head_dim", 64},    {"v_head_dim", 256},             {"n_routed_experts", 256},
      {"num_experts_per_tok", 8},  {"moe_intermediate_size", 2048}, {"n_group", 1},
      {"topk_group", 1},           {"norm_topk_prob", true},        {"routed_scaling_factor", 2.5},
      {"n_shared_experts", 1},     {"first_k_dense_replace", 3}};
  json g = j;
  for (const auto& [key, value] : kDefaults.items()) {
    if (!g.contains(key)) g[key] = value;
  }
  // GLM's attention and indexer rotate interleaved pairs whatever the field says.
  g["rope_interleave"] = true;
  return g;
}

absl::StatusOr<int64_t> Positive(const json& j, const std::string& key, int64_t fallback) {
  LATHE_ASSIGN_OR_RETURN(int64_t v, Int(j, key, fallback));
  if (v < 1 || v > kMaxDim) return FieldError(key, absl::StrCat("must be between 1 and ", kMaxDim, " (is ", v, ")"));
  return v;
}

// mlp_layer_types ("dense" / "sparse" per layer) overrides
// first_k_dense_replace.
absl::Status ReadMlpLayerTypes(const json& j, ModelConfig& c) {
  auto it = j.find("mlp_layer_types");
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_array() || static_cast<int64_t>(it->size()) != c.num_hidden_layers) {
    return FieldError("mlp_layer_types", absl::StrCat("must list \"dense\" or \"sparse\" for each of the ",
                                                      c.num_hidden_layers, " layers"));
  }
  c.mlp_only_layers.clear();
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const json& v = (*it)[i];
    if (!v.is_string() || (v != "dense" && v != "sparse")) {
      return FieldError("mlp_layer_types", absl::StrCat("entry ", i, " must be \"dense\" or \"sparse\""));
    }
    if (v == "dense") c.mlp_only_layers.push_back(i);
  }
  if (!c.mlp_only_layers.empty() && c.intermediate_size <= 0) {
    return FieldError("intermediate_size", "must be positive");
  }
  return absl::OkStatus();
}

// Per layer true for "full", false for "shared": indexer_types, else the
// pattern, else "full" where max(i - offset + 1, 0) is a multiple of freq.
absl::StatusOr<std::vector<bool>> IndexerTypes(const json& j, int64_t layers) {
  std::vector<bool> full;
  auto types = j.find("indexer_types");
  auto pattern = j.find("index_topk_pattern");
  if (types != j.end() && !types->is_null()) {
    if (!types->is_array() || static_cast<int64_t>(types->size()) != layers) {
      return FieldError("indexer_types", absl::StrCat("must list \"full\" or \"shared\" for each of the ", layers,
                                                      " layers"));
    }
    for (const json& v : *types) {
      if (!v.is_string() || (v != "full" && v != "shared")) {
        return FieldError("indexer_types", "entries must be \"full\" or \"shared\"");
      }
      full.push_back(v == "full");
    }
    return full;
  }
  if (pattern != j.end() && !pattern->is_null()) {
    const bool text = pattern->is_string();
    const int64_t n = text ? static_cast<int64_t>(pattern->get<std::string>().size()) : pattern->size();
    if ((!text && !pattern->is_array()) || n != layers) {
      return FieldError("index_topk_pattern", absl::StrCat("must give one of F / S per layer (", layers, ")"));
    }
    for (int64_t i = 0; i < n; ++i) {
      const std::string v = text ? std::string(1, pattern->get<std::string>()[i])
                                 : ((*pattern)[i].is_string() ? (*pattern)[i].get<std::string>() : "");
      if (v != "F" && v != "S" && v != "full" && v != "shared") {
        return FieldError("index_topk_pattern", absl::StrCat("entry ", i, " must be F or S"));
      }
      full.push_back(v == "F" || v == "full");
    }
    return full;
  }
  LATHE_ASSIGN_OR_RETURN(int64_t freq, Int(j, "index_topk_freq", 1));
  LATHE_ASSIGN_OR_RETURN(const int64_t offset, Int(j, "index_skip_topk_offset", 2));
  // transformers reads any offset; beyond ±kMaxDim i - offset + 1 could overflow here.
  if (offset < -kMaxDim || offset > kMaxDim) {
    return FieldError("index_skip_topk_offset", absl::StrCat("must be between ", -kMaxDim, " and ", kMaxDim,
                                                             " (is ", offset, ")"));
  }
  freq = std::max<int64_t>(freq, 1);  // as transformers clamps it
  for (int64_t i = 0; i < layers; ++i) full.push_back(std::max<int64_t>(i - offset + 1, 0) % freq == 0);
  return full;
}

absl::Status ReadIndexer(const json& j, ModelConfig& c) {
  SparseIndexerConfig& x = c.sparse_indexer;
  LATHE_ASSIGN_OR_RETURN(x.index_topk, Positive(j, "index_topk", 2048));
  LATHE_ASSIGN_OR_RETURN(x.index_head_dim, Positive(j, "index_head_dim", 128));
  LATHE_ASSIGN_OR_RETURN(x.index_n_heads, Positive(j, "index_n_heads", 32));
  if (x.index_head_dim < c.latent_attention.qk_rope_head_dim) {
    return FieldError("index_head_dim", absl::StrCat("(", x.index_head_dim, ") must be at least qk_rope_head_dim (",
                                                     c.latent_attention.qk_rope_head_dim, ")"));
  }
  LATHE_ASSIGN_OR_RETURN(const std::vector<bool> full, IndexerTypes(j, c.num_hidden_layers));
  x.selection_layer.clear();
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    if (full[i]) {
      x.selection_layer.push_back(i);
    } else if (i == 0) {
      // transformers raises: a shared layer needs a full one before it.
      return FieldError("indexer_types", "has \"shared\" for layer 0, which has no earlier full layer");
    } else {
      x.selection_layer.push_back(x.selection_layer.back());
    }
  }
  return absl::OkStatus();
}

}  // namespace

bool IsGlmMoeDsa(const std::string& a) { return a == "GlmMoeDsaForCausalLM"; }

absl::Status ReadGlmMoeDsa(const json& j, ModelConfig& c) {
  const json g = WithGlmDefaults(j);
  if (g["q_lora_rank"].is_null() || (g["q_lora_rank"].is_number_integer() && g["q_lora_rank"].get<int64_t>() == 0)) {
    return FieldError("q_lora_rank", "must be set; GLM-MoE-DSA's indexer reads the q LoRA's normed output");
  }
  if (!j.contains("rms_norm_eps")) c.rms_norm_eps = 1e-5;
  LATHE_RETURN_IF_ERROR(ReadDeepseekV3(g, c));
  LATHE_RETURN_IF_ERROR(ReadMlpLayerTypes(j, c));
  return ReadIndexer(j, c);
}

}  // namespace lathe::runtime
