// Training checkpoints: a run's trainable parameters and AdamW state written
// as shards by the ranks that hold them, described by one manifest, and read
// back under any layout (each rank takes the slices it needs).
//
// A checkpoint folder <dir> holds node_rank-<n>/rank-<local_rank>.safetensors
// (tensors "param/<name>", "exp_avg/<name>", "exp_avg_sq/<name>") and
// manifest.json, written last: the format, run, step, layout, LoRA config
// and, for every tensor slice, its global shape, box, file, byte range and
// CRC-32C. Everything is written under "<dir>.partial" and renamed once the
// shards and the manifest are on disk, so a folder named <dir> is complete.
#ifndef LATHE_RUNTIME_CHECKPOINT_H_
#define LATHE_RUNTIME_CHECKPOINT_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "parallel/communicator.h"
#include "core/lora_settings.h"

namespace lathe::runtime {

class Trainer;

struct CheckpointMeta {
  std::string run_id;
  std::string name;
  std::string base_model;
  int64_t policy_version = 0;
  // The layout it was saved under (for information; loading reshards).
  int replicas = 1, node_count = 1, devices_per_node = 1, tp = 1, ep = 1, cp = 1;
  bool with_optimizer = true;  // false: parameters only
  int64_t ttl_seconds = 0;      // > 0: the coordinator deletes it that long after saving
};

struct ShardPlace {
  int node_rank = 0;
  int local_rank = 0;
};

// Writes `trainer`'s state to `dir`. Collective over `group`, the ranks of
// one replica (null: a single process); each distinct slice is written once,
// by the lowest member holding it. AlreadyExists when `dir` exists and
// `overwrite` is false (nothing written); I/O errors as they happen, after
// which the first member removes the partial folder (one a member leaves by
// dying or stalling mid-save is cleared by the next save of the name). An
// overwrite keeps the old checkpoint when the new one cannot be renamed in.
// Every member returns the same status.
absl::Status SaveCheckpoint(Trainer& trainer, const std::string& dir, bool overwrite, const CheckpointMeta& meta,
                            const ShardPlace& place, parallel::Communicator* group, absl::Duration timeout);

// Replaces `trainer`'s parameters (and with `with_optimizer` its AdamW
// moments and step; otherwise a fresh optimizer) with the checkpoint's,
// resharded to this rank's slices, and clears accumulated gradients.
// Returns the optimizer step after loading. Collective over `world` (null: a
// single process): either every rank loads or none changes anything.
// NotFound for a missing checkpoint; FailedPrecondition when its LoRA
// config or shapes differ from the run's; DataLoss naming the file for a
// missing, truncated or corrupt shard or manifest.
absl::StatusOr<int64_t> LoadCheckpoint(Trainer& trainer, const std::string& dir, bool with_optimizer,
                                       parallel::Communicator* world, absl::Duration timeout);

// The LoRA config a checkpoint was saved with (rank 0: full fine-tuning).
// NotFound for a missing checkpoint; DataLoss for a missing or malformed
// manifest. Not collective.
absl::StatusOr<LoraSettings> ReadCheckpointLora(const std::string& dir);

// This rank's parts of the checkpoint's parameters, shaped like (and in the
// order of) trainer's trainable parameters; the trainer is not changed.
// Errors as LoadCheckpoint's. Not collective.
absl::StatusOr<std::vector<at::Tensor>> ReadCheckpointParams(const Trainer& trainer, const std::string& dir);

// The whole tensors of one kind ("param", "exp_avg", "exp_avg_sq") of a
// checkpoint, assembled from its slices (CRC-checked), by parameter name.
// Errors as LoadCheckpoint's.
absl::StatusOr<std::map<std::string, at::Tensor>> ReadCheckpointTensors(const std::string& dir,
                                                                       const std::string& kind);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_CHECKPOINT_H_
