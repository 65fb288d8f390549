// What the coordinator reads of a checkpoint: its creation and expiry times,
// from the manifest of a training checkpoint or the lathe_sampler.json of a
// sampler one. The files come from a shared folder anyone may have written
// to, so every read is checked: nothing in them can throw.
#ifndef LATHE_COORDINATOR_CHECKPOINT_META_H_
#define LATHE_COORDINATOR_CHECKPOINT_META_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/checkpoint_path.h"

namespace lathe::coordinator {

struct CheckpointMeta {
  std::optional<int64_t> created_unix_ms;  // absent in old sampler checkpoints
  int64_t expires_unix_ms = 0;             // 0: never
};

// Parses a training checkpoint's manifest (`kind` "weights": a JSON object
// with format "lathe-checkpoint-1") or a sampler checkpoint's sidecar (kind
// "sampler_weights": a JSON object). created_unix_ms and expires_unix_ms are
// optional, and must be non-negative integers when present (null counts as
// absent). Only those fields are kept while parsing, so memory does not grow
// with the text. DataLoss, saying what is wrong, for anything else (JSON
// nested more than 64 deep included).
absl::StatusOr<CheckpointMeta> ParseCheckpointMeta(absl::string_view text, const std::string& kind);

// The file a checkpoint of `kind` keeps its times in: manifest.json for
// "weights", lathe_sampler.json for "sampler_weights".
const char* CheckpointMetaFile(const std::string& kind);

// Reads and parses the manifest or sidecar of the checkpoint `ref` under
// `root` without following links (a sampler checkpoint without a sidecar has
// empty metadata). DataLoss when it is unreadable, a link, larger than
// `max_bytes`, or does not parse.
absl::StatusOr<CheckpointMeta> ReadCheckpointMeta(const std::string& root, const runtime::CheckpointRef& ref,
                                                  int64_t max_bytes);

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_CHECKPOINT_META_H_
