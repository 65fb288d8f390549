// `lathe plan`: where each rank of a deployment sits (replica, node_rank,
// local rank, tp and ep shard) and an estimate of the memory each device
// needs, from a preset or an explicit layout — before any GPU is spent.
#ifndef LATHE_CLIENT_PLAN_H_
#define LATHE_CLIENT_PLAN_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "parallel/mesh.h"
#include "presets/layout.h"
#include "presets/preset_table.h"

namespace lathe::client {

// Bytes one device holds; see docs/launching.md for the assumptions.
struct MemoryEstimate {
  double weights = 0;          // fp32 base weights of this device's shard (the runtime converts on load)
  double trainable_state = 0;  // LoRA: adapter + gradient + Adam m, v; full: gradient + m, v (all fp32)
  double activations = 0;      // fp32, one max_seq_len micro-batch with chunked logprobs and recompute as the runtime runs it
  double total() const { return weights + trainable_state + activations; }
};

// Per-device estimate for `facts` cut by `shape` (tp, ep) at `max_seq_len`
// tokens; lora_rank 0 = full fine-tuning. FailedPrecondition naming what is
// missing when the facts are incomplete.
absl::StatusOr<MemoryEstimate> EstimateMemory(const presets::ModelFacts& facts, const parallel::MeshShape& shape,
                                              int64_t max_seq_len, int lora_rank);

struct PlanOptions {
  presets::LayoutRequest layout;  // devices_per_node required when the model has no preset
  int lora_rank = 32;
  double device_memory_gib = 80;
  std::string format = "table";  // "table" or "env" (shell assignments for the launch scripts)
};

// Prints the plan to stdout; returns the exit code (0; 1 with the reason on
// stderr for a layout the model or the mesh refuses; 3 when the estimate
// exceeds 90% of device_memory_gib, the rest left for what it does not count). Unverified presets are planned, marked as such.
int PlanCommand(const std::vector<presets::Preset>& table, const PlanOptions& options);

// Prints the preset table; returns 0.
int ListPresetsCommand(const std::vector<presets::Preset>& table);

}  // namespace lathe::client

#endif  // LATHE_CLIENT_PLAN_H_
