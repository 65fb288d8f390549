// `lathe plan`: where each rank of a deployment sits (replica, node_rank,
// local rank, tp, cp and ep shard) and an estimate of the memory each device
// needs, from a preset or an explicit layout — before any GPU is spent.
#ifndef LATHE_CLIENT_PLAN_H_
#define LATHE_CLIENT_PLAN_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model_config.h"
#include "parallel/mesh.h"
#include "presets/layout.h"
#include "presets/preset_table.h"

namespace lathe::client {

// What the runtime holds its base weights and activations in. bfloat16 is
// the GPU default; CPU ranks run float32.
enum class Dtype { kBfloat16, kFloat32 };

// "bfloat16" or "float32"; InvalidArgument naming the value otherwise.
absl::StatusOr<Dtype> ParseDtype(std::string_view name);
const char* DtypeName(Dtype dtype);

// Bytes one device holds; docs/launching.md gives the formula of each term.
struct MemoryEstimate {
  double weights = 0;          // base weights of this device's shard, in the dtype (bf16: the working copy)
  double trainable_state = 0;  // LoRA: fp32 adapter, gradient, Adam m, v; full: see docs/launching.md
  double activations = 0;      // one sequence's T/cp tokens on this rank, chunked logprobs, recompute as the runtime runs it
  double gathered_kv = 0;      // cp > 1: the whole sequence's K and V (and their gradients) of attention layers
  double key_selection = 0;    // sparse attention: the indexers' key masks and the attention's mask bias
  double total() const { return weights + trainable_state + activations + gathered_kv + key_selection; }
};

// Per-device estimate for the model of `config` cut by `shape` (tp, ep, cp)
// at `max_seq_len` tokens; lora_rank 0 = full fine-tuning. Its parameters
// are those of the architecture's parameter table (params/), counted at the
// widest rank. FailedPrecondition when the architecture has no description;
// InvalidArgument for a non-positive max_seq_len.
absl::StatusOr<MemoryEstimate> EstimateMemory(const runtime::ModelConfig& config, const parallel::MeshShape& shape,
                                              int64_t max_seq_len, int lora_rank, Dtype dtype);

// The share of a device the estimate may fill: what it leaves out (the
// backward's transient buffers, the allocator's fragmentation, the CUDA and
// NCCL contexts) needs the rest.
inline constexpr double kUsableFraction = 0.9;

// Whether `estimate` fits a device of `device_gib` GiB (within kUsableFraction).
bool Fits(const MemoryEstimate& estimate, double device_gib);

// The devices `plan` always reports against.
struct DeviceModel {
  const char* name;
  double gib;
};
inline constexpr DeviceModel kH100{"H100 80 GB", 80};
inline constexpr DeviceModel kH200{"H200 141 GB", 139};

struct PlanOptions {
  presets::LayoutRequest layout;  // devices_per_node required when the model has no preset
  int lora_rank = 32;
  Dtype dtype = Dtype::kBfloat16;
  double device_memory_gib = 0;  // 0: none besides the H100 and H200
  std::string format = "table";  // "table" or "env" (shell assignments for the launch scripts)
  // A config.json (or a model folder holding one) the estimate and the
  // layout check read instead of the preset's config; empty: the preset's.
  std::string config_path;
};

// Prints the plan to stdout; returns the exit code: 0; 1 with the reason on
// stderr for a layout the model or the mesh refuses; 3 when the estimate
// does not fit the target device (within 90% of it): device_memory_gib when
// given, else the H100 (80 GB). Unverified presets are planned, marked as
// such; a model without a config lathe describes gets no estimate (exit 0).
int PlanCommand(const std::vector<presets::Preset>& table, const PlanOptions& options);

// Prints the preset table with each row's estimate per device (at its own
// layout and max_seq_len, options' lora_rank and dtype; "-" where its config
// allows none) and whether it fits an H100 and an H200; returns 0.
int ListPresetsCommand(const std::vector<presets::Preset>& table, const PlanOptions& options);

}  // namespace lathe::client

#endif  // LATHE_CLIENT_PLAN_H_
