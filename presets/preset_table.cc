// Parsing and lookup of the preset table.
#include "presets/preset_table.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "core/status.h"

namespace lathe::presets {
namespace {

using nlohmann::json;

// Reads an integer field >= min; `fallback` when absent and not required.
absl::StatusOr<int64_t> Int(const json& row, const char* field, bool required, int64_t min, int64_t fallback = 0) {
  auto it = row.find(field);
  if (it == row.end()) {
    if (required) return absl::InvalidArgumentError(absl::StrCat("missing field '", field, "'"));
    return fallback;
  }
  if (!it->is_number_integer() || it->get<int64_t>() < min) {
    return absl::InvalidArgumentError(absl::StrCat("field '", field, "' must be an integer >= ", min));
  }
  return it->get<int64_t>();
}

absl::StatusOr<ModelFacts> ParseFacts(const json& f) {
  if (!f.is_object()) return absl::InvalidArgumentError("'facts' must be an object");
  ModelFacts m;
  struct Field {
    const char* name;
    int64_t* out;
  };
  const Field fields[] = {{"hidden_size", &m.hidden_size},
                          {"num_hidden_layers", &m.num_hidden_layers},
                          {"num_attention_heads", &m.num_attention_heads},
                          {"num_key_value_heads", &m.num_key_value_heads},
                          {"head_dim", &m.head_dim},
                          {"intermediate_size", &m.intermediate_size},
                          {"vocab_size", &m.vocab_size},
                          {"num_experts", &m.num_experts},
                          {"num_experts_per_tok", &m.num_experts_per_tok},
                          {"moe_intermediate_size", &m.moe_intermediate_size},
                          {"shared_experts", &m.shared_experts},
                          {"first_dense_layers", &m.first_dense_layers},
                          {"linear_num_key_heads", &m.linear_num_key_heads},
                          {"linear_num_value_heads", &m.linear_num_value_heads},
                          {"linear_key_head_dim", &m.linear_key_head_dim},
                          {"linear_value_head_dim", &m.linear_value_head_dim},
                          {"linear_conv_kernel_dim", &m.linear_conv_kernel_dim},
                          {"full_attention_interval", &m.full_attention_interval},
                          {"shared_expert_intermediate_size", &m.shared_expert_intermediate_size}};
  for (const Field& field : fields) {
    auto v = Int(f, field.name, false, 0);
    if (!v.ok()) return v.status();
    *field.out = *v;
  }
  for (auto [name, out] : {std::pair{"tie_word_embeddings", &m.tie_word_embeddings},
                            {"attn_output_gate", &m.attn_output_gate}}) {
    if (auto it = f.find(name); it != f.end()) {
      if (!it->is_boolean()) {
        return absl::InvalidArgumentError(absl::StrCat("field '", name, "' must be true or false"));
      }
      *out = it->get<bool>();
    }
  }
  if (m.linear_num_key_heads > 0 && m.linear_num_value_heads % m.linear_num_key_heads != 0) {
    return absl::InvalidArgumentError("'linear_num_value_heads' must be a multiple of 'linear_num_key_heads'");
  }
  for (auto it = f.begin(); it != f.end(); ++it) {
    bool known = it.key() == "tie_word_embeddings" || it.key() == "attn_output_gate";
    for (const Field& field : fields) known = known || it.key() == field.name;
    if (!known) return absl::InvalidArgumentError(absl::StrCat("unknown fact '", it.key(), "'"));
  }
  return m;
}

absl::StatusOr<std::string> String(const json& row, const char* field, bool required) {
  auto it = row.find(field);
  if (it == row.end()) {
    if (required) return absl::InvalidArgumentError(absl::StrCat("missing field '", field, "'"));
    return std::string();
  }
  if (!it->is_string()) return absl::InvalidArgumentError(absl::StrCat("field '", field, "' must be a string"));
  return it->get<std::string>();
}

absl::StatusOr<Preset> ParseRow(const json& row) {
  if (!row.is_object()) return absl::InvalidArgumentError("a preset must be an object");
  Preset p;
  LATHE_ASSIGN_OR_RETURN(p.base_model, String(row, "base_model", true));
  if (p.base_model.empty()) return absl::InvalidArgumentError("empty 'base_model'");
  LATHE_ASSIGN_OR_RETURN(p.architecture, String(row, "architecture", true));
  LATHE_ASSIGN_OR_RETURN(p.note, String(row, "note", false));
  int* layout[] = {&p.node_count, &p.devices_per_node, &p.tp, &p.ep, &p.cp};
  const char* names[] = {"node_count", "devices_per_node", "tp", "ep", "cp"};
  for (int i = 0; i < 5; ++i) {
    const bool optional = i == 4;  // cp: 1 when absent
    LATHE_ASSIGN_OR_RETURN(int64_t v, Int(row, names[i], !optional, 1, 1));
    if (v > (int64_t{1} << 20)) {
      return absl::InvalidArgumentError(absl::StrCat("field '", names[i], "' must be at most 1048576"));
    }
    *layout[i] = static_cast<int>(v);
  }
  LATHE_ASSIGN_OR_RETURN(p.max_seq_len, Int(row, "max_seq_len", true, 1));
  auto verified = row.find("verified");
  if (verified == row.end() || !verified->is_boolean()) {
    return absl::InvalidArgumentError("field 'verified' must be true or false");
  }
  p.verified = verified->get<bool>();
  auto facts = row.find("facts");
  if (facts == row.end()) return absl::InvalidArgumentError("missing field 'facts'");
  LATHE_ASSIGN_OR_RETURN(p.facts, ParseFacts(*facts));
  if (p.verified && !p.facts.Complete()) {
    return absl::InvalidArgumentError("a verified preset needs every fact of its architecture");
  }
  parallel::MeshShape shape{1, p.node_count, p.devices_per_node, p.tp, p.ep, p.cp};
  LATHE_RETURN_IF_ERROR(parallel::ValidateMesh(shape, shape.world_size(), p.facts.Dims()));
  return p;
}

std::string LastPart(std::string_view name) {
  size_t slash = name.rfind('/');
  return absl::AsciiStrToLower(std::string(slash == std::string_view::npos ? name : name.substr(slash + 1)));
}

std::string ExecutableDir() {
  std::error_code ec;
  std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string() : exe.parent_path().string();
}

}  // namespace

bool ModelFacts::Complete() const {
  bool attention = hidden_size > 0 && num_hidden_layers > 0 && num_attention_heads > 0 && num_key_value_heads > 0 &&
                   head_dim > 0 && vocab_size > 0;
  bool mlp = is_moe() ? (num_experts_per_tok > 0 && moe_intermediate_size > 0 &&
                         (first_dense_layers == 0 || intermediate_size > 0))
                      : intermediate_size > 0;
  bool linear = !is_hybrid() || (linear_num_key_heads > 0 && linear_key_head_dim > 0 && linear_value_head_dim > 0 &&
                                  linear_conv_kernel_dim > 0 && full_attention_interval > 0);
  return attention && mlp && linear;
}

int64_t ModelFacts::linear_attention_layers() const {
  if (!is_hybrid() || full_attention_interval <= 0) return 0;
  return num_hidden_layers - num_hidden_layers / full_attention_interval;
}

parallel::ModelDims ModelFacts::Dims() const {
  parallel::ModelDims d;
  d.num_attention_heads = num_attention_heads;
  d.num_key_value_heads = num_key_value_heads;
  d.num_experts = num_experts;
  // The dense MLP is split over tp only where the model has one.
  d.intermediate_size = (!is_moe() || first_dense_layers > 0) ? intermediate_size : 0;
  d.linear_num_key_heads = linear_num_key_heads;
  d.linear_num_value_heads = linear_num_value_heads;
  d.shared_expert_intermediate_size = shared_expert_intermediate_size;
  return d;
}

absl::StatusOr<std::vector<Preset>> ParsePresets(const std::string& json_text) {
  json doc = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return absl::InvalidArgumentError("the preset table is not valid JSON");
  auto rows = doc.find("presets");
  if (!doc.is_object() || rows == doc.end() || !rows->is_array()) {
    return absl::InvalidArgumentError("the preset table needs a 'presets' array");
  }
  std::vector<Preset> out;
  for (size_t i = 0; i < rows->size(); ++i) {
    absl::StatusOr<Preset> p = ParseRow((*rows)[i]);
    std::string which = absl::StrCat("preset ", i);
    if ((*rows)[i].is_object() && (*rows)[i].contains("base_model") && (*rows)[i]["base_model"].is_string()) {
      which = absl::StrCat("preset '", (*rows)[i]["base_model"].get<std::string>(), "'");
    }
    if (!p.ok()) return absl::InvalidArgumentError(absl::StrCat(which, ": ", p.status().message()));
    if (FindPreset(out, p->base_model) != nullptr || FindPreset(out, LastPart(p->base_model)) != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(which, ": the name is listed twice"));
    }
    out.push_back(std::move(*p));
  }
  return out;
}

absl::StatusOr<std::vector<Preset>> LoadPresets(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read the preset table ", path));
  std::stringstream text;
  text << in.rdbuf();
  absl::StatusOr<std::vector<Preset>> presets = ParsePresets(text.str());
  if (!presets.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", presets.status().message()));
  return presets;
}

const Preset* FindPreset(const std::vector<Preset>& presets, std::string_view name) {
  const std::string lower = absl::AsciiStrToLower(std::string(name));
  for (const Preset& p : presets) {
    if (absl::AsciiStrToLower(p.base_model) == lower) return &p;
  }
  if (name.find('/') != std::string_view::npos) return nullptr;
  for (const Preset& p : presets) {
    if (LastPart(p.base_model) == lower) return &p;
  }
  return nullptr;
}

std::string DefaultPresetsPath() {
  // A path named by the environment is used as given, so a wrong one is reported.
  if (const char* env = std::getenv("LATHE_PRESETS"); env != nullptr && *env != '\0') return env;
  std::vector<std::string> candidates;
  if (std::string dir = ExecutableDir(); !dir.empty()) {
    candidates.push_back(dir + "/../share/lathe/presets/models.json");
  }
  candidates.push_back(LATHE_SOURCE_PRESETS);
  for (const std::string& c : candidates) {
    std::error_code ec;
    if (std::filesystem::is_regular_file(c, ec)) return std::filesystem::path(c).lexically_normal().string();
  }
  return "";
}

lathe::v1::ModelPreset ToProto(const Preset& p) {
  lathe::v1::ModelPreset out;
  out.set_base_model(p.base_model);
  out.set_architecture(p.architecture);
  lathe::v1::Layout* layout = out.mutable_layout();
  layout->set_node_count(p.node_count);
  layout->set_devices_per_node(p.devices_per_node);
  layout->set_tp(p.tp);
  layout->set_ep(p.ep);
  layout->set_cp(p.cp);
  out.set_max_seq_len(p.max_seq_len);
  out.set_verified(p.verified);
  out.set_note(p.note);
  return out;
}

}  // namespace lathe::presets
