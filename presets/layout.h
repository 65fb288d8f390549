// The layout a deployment runs: from the model's preset, from explicit
// degrees, or the preset with some degrees overridden. A model outside the
// preset table needs an explicit layout.
#ifndef LATHE_PRESETS_LAYOUT_H_
#define LATHE_PRESETS_LAYOUT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "parallel/mesh.h"
#include "presets/preset_table.h"

namespace lathe::presets {

// What a user asked for; 0 = not given.
struct LayoutRequest {
  std::string model;  // the base model's name (Hugging Face id or its last part)
  int replicas = 0;
  int node_count = 0;
  int devices_per_node = 0;
  int tp = 0;
  int ep = 0;
  int cp = 0;
  int64_t max_seq_len = 0;

  // Whether any degree (replicas, node_count, devices_per_node, tp, ep, cp) is given.
  bool Explicit() const {
    return replicas > 0 || node_count > 0 || devices_per_node > 0 || tp > 0 || ep > 0 || cp > 0;
  }
};

struct ResolvedLayout {
  parallel::MeshShape shape;   // devices_per_node 0 when neither preset nor request gives it
  int64_t max_seq_len = 0;     // 0: the model's own
  std::optional<Preset> preset;  // the matching row, if any
};

// Fills what the request leaves out from the model's preset (1 for a model
// without one), the request winning where both give a value. Errors:
// InvalidArgument when the model has no preset and the request gives no
// degree (naming the flags to give), or when a negative value is given;
// FailedPrecondition when the preset is declared but not verified (its
// architecture is not supported yet) and `allow_unverified` is false.
absl::StatusOr<ResolvedLayout> ResolveLayout(const std::vector<Preset>& presets, const LayoutRequest& request,
                                             bool allow_unverified);

}  // namespace lathe::presets

#endif  // LATHE_PRESETS_LAYOUT_H_
