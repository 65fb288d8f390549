// Layout resolution: preset first, explicit degrees over it.
#include "presets/layout.h"

#include "absl/strings/str_cat.h"

namespace lathe::presets {

absl::StatusOr<ResolvedLayout> ResolveLayout(const std::vector<Preset>& presets, const LayoutRequest& r,
                                             bool allow_unverified) {
  for (int v : {r.replicas, r.node_count, r.devices_per_node, r.tp, r.ep, r.cp}) {
    if (v < 0) return absl::InvalidArgumentError("layout degrees must be positive (0: from the preset)");
  }
  if (r.max_seq_len < 0) return absl::InvalidArgumentError("max_seq_len must be positive (0: from the preset)");
  ResolvedLayout out;
  const Preset* p = FindPreset(presets, r.model);
  if (p != nullptr) out.preset = *p;
  if (p == nullptr && !r.Explicit()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model '", r.model, "' is not in the preset table (", presets.size(),
        " models; `lathe plan --list` shows them): give its layout explicitly (--replicas, --node_count, --tp, "
        "--ep; --base_model names a preset)"));
  }
  if (p != nullptr && !p->verified && !allow_unverified) {
    return absl::FailedPreconditionError(absl::StrCat(
        "preset '", p->base_model, "' is declared but not verified: lathe does not support its "
        "architecture (", p->architecture, ") yet"));
  }
  auto pick = [](int given, int from_preset) { return given > 0 ? given : from_preset; };
  out.shape.replicas = pick(r.replicas, 1);
  out.shape.node_count = pick(r.node_count, p ? p->node_count : 1);
  out.shape.devices_per_node = pick(r.devices_per_node, p ? p->devices_per_node : 0);
  out.shape.tp = pick(r.tp, p ? p->tp : 1);
  out.shape.ep = pick(r.ep, p ? p->ep : 1);
  out.shape.cp = pick(r.cp, p ? p->cp : 1);
  out.max_seq_len = r.max_seq_len > 0 ? r.max_seq_len : (p ? p->max_seq_len : 0);
  return out;
}

}  // namespace lathe::presets
