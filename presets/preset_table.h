// The preset table (presets/models.json): for each base model the node group
// one replica takes (node_count, devices_per_node, tp, ep, cp), the longest datum
// and the model's config.json fields, from which the layout checks and the
// memory estimate (through params/) derive.
// Torch- and MPI-free: the coordinator, dp_worker and the `lathe` CLI read it.
#ifndef LATHE_PRESETS_PRESET_TABLE_H_
#define LATHE_PRESETS_PRESET_TABLE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model_config.h"
#include "lathe/v1/service.pb.h"
#include "parallel/mesh.h"

namespace lathe::presets {

// The layout-checked dimensions of a model's config (the mesh validation's).
parallel::ModelDims DimsOf(const runtime::ModelConfig& config);

struct Preset {
  std::string base_model;    // Hugging Face id, "Org/Name"
  std::string architecture;  // config.json architectures[0]
  int node_count = 1;
  int devices_per_node = 1;
  int tp = 1;
  int ep = 1;
  int cp = 1;  // optional in the table (default 1)
  int64_t max_seq_len = 0;
  bool verified = false;
  std::string note;
  // For an architecture lathe does not describe: the described one whose
  // parameter table stands in for the estimate (the note says what differs).
  std::string estimate_as;
  // The row's `config`, config.json's own fields (a wrapper's text fields
  // under text_config), as runtime::ParseModelConfig reads them with
  // `architectures` set to the row's architecture (or estimate_as). Absent
  // in a declared row whose fields are too few or whose architecture lathe
  // does not read: no estimate, `config_error` says why.
  std::optional<runtime::ModelConfig> config;
  std::string config_error;
  // What the layout check uses: from `config`, else from the raw fields.
  parallel::ModelDims dims;
};

// Parses the table. InvalidArgument naming the row and field for malformed
// JSON, a missing or ill-typed field, a duplicate name, a layout its own
// config refuses (parallel::ValidateMesh), a config that gives
// `architectures`, or one that does not parse (naming the field) in a
// verified row, in a row with estimate_as, or for a reason other than a
// missing field or an architecture lathe does not read.
absl::StatusOr<std::vector<Preset>> ParsePresets(const std::string& json_text);

// Reads and parses `path`. NotFound when it cannot be read; errors of
// ParsePresets prefixed with the path.
absl::StatusOr<std::vector<Preset>> LoadPresets(const std::string& path);

// The row named `name`: the full id ("Qwen/Qwen3-8B") or its last part
// ("Qwen3-8B", e.g. a model folder's name), compared case-insensitively.
// nullptr when none matches.
const Preset* FindPreset(const std::vector<Preset>& presets, std::string_view name);

// Where the table is looked for when no --presets flag names it: $LATHE_PRESETS
// (used as given, so a wrong path is reported), then <executable's folder>/../share/lathe/presets/models.json (installed),
// then the source tree's presets/models.json. The first that exists; empty
// when none does.
std::string DefaultPresetsPath();

// The row as served by GetCapabilities.
lathe::v1::ModelPreset ToProto(const Preset& preset);

}  // namespace lathe::presets

#endif  // LATHE_PRESETS_PRESET_TABLE_H_
