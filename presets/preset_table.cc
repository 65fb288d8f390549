// Parsing and lookup of the preset table.
#include "presets/preset_table.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
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

// The raw dims of a config that does not parse: what the fields say,
// a wrapper's under text_config.
parallel::ModelDims RawDims(const json& config) {
  const json& j = config.contains("text_config") && config["text_config"].is_object() ? config["text_config"] : config;
  auto get = [&](std::initializer_list<const char*> keys) -> int64_t {
    for (const char* k : keys) {
      if (auto it = j.find(k); it != j.end() && it->is_number_integer()) return it->get<int64_t>();
    }
    return 0;
  };
  parallel::ModelDims d;
  d.num_attention_heads = get({"num_attention_heads"});
  d.num_key_value_heads = get({"num_key_value_heads", "num_attention_heads"});
  d.num_experts = get({"num_experts", "n_routed_experts", "num_local_experts"});
  d.intermediate_size = get({"intermediate_size"});
  d.linear_num_key_heads = get({"linear_num_key_heads"});
  d.linear_num_value_heads = get({"linear_num_value_heads"});
  d.shared_expert_intermediate_size = get({"shared_expert_intermediate_size"});
  return d;
}

// Reads the row's config (its `architectures` the row's, or estimate_as's).
absl::Status ParseConfig(const json& row, Preset& p) {
  auto it = row.find("config");
  if (it == row.end()) return absl::InvalidArgumentError("missing field 'config'");
  if (!it->is_object()) return absl::InvalidArgumentError("'config' must be an object (config.json's fields)");
  if (it->contains("architectures")) {
    return absl::InvalidArgumentError("'config' must not give 'architectures' (the row's 'architecture' is used)");
  }
  json config = *it;
  config["architectures"] = json::array({p.estimate_as.empty() ? p.architecture : p.estimate_as});
  absl::StatusOr<runtime::ModelConfig> parsed = runtime::ParseModelConfig(config.dump());
  if (parsed.ok()) {
    p.config = *std::move(parsed);
    p.dims = DimsOf(*p.config);
    return absl::OkStatus();
  }
  // A declared row may give too few fields, or name an architecture lathe
  // does not read: it gets no estimate. A field it gives must be right.
  const std::string why(parsed.status().message());
  const bool too_few = absl::StrContains(why, "' is required") || absl::StrContains(why, "field 'architectures'");
  if (p.verified || !p.estimate_as.empty() || !too_few) {
    return absl::InvalidArgumentError(absl::StrCat("'config': ", why));
  }
  p.config_error = std::string(parsed.status().message());
  p.dims = RawDims(config);
  return absl::OkStatus();
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
  LATHE_ASSIGN_OR_RETURN(p.estimate_as, String(row, "estimate_as", false));
  if (p.verified && !p.estimate_as.empty()) {
    return absl::InvalidArgumentError("a verified preset runs its own architecture: no 'estimate_as'");
  }
  LATHE_RETURN_IF_ERROR(ParseConfig(row, p));
  parallel::MeshShape shape{1, p.node_count, p.devices_per_node, p.tp, p.ep, p.cp};
  LATHE_RETURN_IF_ERROR(parallel::ValidateMesh(shape, shape.world_size(), p.dims));
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

parallel::ModelDims DimsOf(const runtime::ModelConfig& c) {
  parallel::ModelDims d;
  d.num_attention_heads = c.num_attention_heads;
  d.num_key_value_heads = c.num_key_value_heads;
  d.num_experts = c.num_experts;
  // The dense MLP is split over tp only where the model has one.
  d.intermediate_size = c.HasDenseMlp() ? c.intermediate_size : 0;
  if (c.IsHybrid()) {
    d.linear_num_key_heads = c.linear_attention.num_key_heads;
    d.linear_num_value_heads = c.linear_attention.num_value_heads;
  }
  d.shared_expert_intermediate_size = c.num_experts > 0 ? c.shared_expert.intermediate_size : 0;
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
