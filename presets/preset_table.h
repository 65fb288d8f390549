// The preset table (presets/models.json): for each base model the node group
// one replica takes (node_count, devices_per_node, tp, ep, cp), the longest datum
// and the config.json facts the layout checks and the memory estimate use.
// Torch- and MPI-free: the coordinator, dp_worker and the `lathe` CLI read it.
#ifndef LATHE_PRESETS_PRESET_TABLE_H_
#define LATHE_PRESETS_PRESET_TABLE_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "lathe/v1/service.pb.h"
#include "parallel/mesh.h"

namespace lathe::presets {

// Numbers from a model's config.json; 0 where the table gives none.
struct ModelFacts {
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate_size = 0;      // dense MLP width (dense layers of a MoE model too)
  int64_t vocab_size = 0;
  bool tie_word_embeddings = false;
  int64_t num_experts = 0;            // 0: dense model
  int64_t num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;
  int64_t shared_experts = 0;         // experts every token passes through, moe_intermediate_size wide
  int64_t first_dense_layers = 0;     // leading layers with a dense MLP in a MoE model
  // Qwen3.5-style hybrids: Gated DeltaNet linear-attention layers, all but
  // every full_attention_interval-th (0 heads: every layer full attention).
  int64_t linear_num_key_heads = 0;
  int64_t linear_num_value_heads = 0;
  int64_t linear_key_head_dim = 0;
  int64_t linear_value_head_dim = 0;
  int64_t linear_conv_kernel_dim = 0;
  int64_t full_attention_interval = 0;
  bool attn_output_gate = false;                // q_proj twice as wide: per head [q | gate]
  int64_t shared_expert_intermediate_size = 0;  // one shared expert this wide with a sigmoid gate (h x 1)

  bool is_moe() const { return num_experts > 0; }
  bool is_hybrid() const { return linear_num_value_heads > 0; }
  // Layers of each kind: layer i is full attention when (i + 1) %
  // full_attention_interval == 0 (transformers' default layer_types).
  int64_t linear_attention_layers() const;
  int64_t full_attention_layers() const { return num_hidden_layers - linear_attention_layers(); }
  // Whether every number the memory estimate needs is present.
  bool Complete() const;
  // The subset the mesh validation checks.
  parallel::ModelDims Dims() const;
};

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
  ModelFacts facts;
};

// Parses the table. InvalidArgument naming the row and field for malformed
// JSON, a missing or ill-typed field, a duplicate name, a layout its own
// facts refuse (parallel::ValidateMesh), or a verified row whose facts are
// incomplete.
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
