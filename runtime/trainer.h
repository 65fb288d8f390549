// The training operations of one run on one process: forward,
// forward_backward, optim_step, get_info. The parallel and service layers call
// these with the same wire types the API carries.
//
// Not thread-safe: one thread owns a Trainer (and its model) at a time.
#ifndef LATHE_RUNTIME_TRAINER_H_
#define LATHE_RUNTIME_TRAINER_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "lathe/v1/types.pb.h"
#include "parallel/context.h"
#include "core/dtype.h"
#include "core/lora_settings.h"

namespace lathe::runtime {

class DecoderModel;
class AdamW;

// Per-layer activation recompute: on, off, or on for calls whose longest
// micro-batch holds more than kRecomputeAutoTokens tokens.
enum class Recompute { kAuto, kOn, kOff };
inline constexpr int64_t kRecomputeAutoTokens = 2048;
// "auto", "on", "off"; InvalidArgument otherwise.
absl::StatusOr<Recompute> ParseRecompute(const std::string& name);

struct TrainerOptions {
  std::string model_dir;
  LoraSettings lora;
  int64_t max_seq_len = 0;  // 0: the model's max_position_embeddings
  // Datums of one call are packed into micro-batches of at most this many
  // tokens (one forward and backward each). 0: sized so the fp32 logits of a
  // micro-batch stay near 256 MiB.
  int64_t micro_batch_tokens = 0;
  // Keep freed memory in the process heap instead of returning it to the OS
  // (glibc mallopt, process-wide): logits-sized buffers are then reused
  // without page faults, at the cost of a higher resident set. Calls whose
  // micro-batches are longer than one logprob chunk map their large blocks
  // (>= 32 MiB) instead: their same-sized chunk buffers, interleaved with
  // smaller ones, would fragment the heap (peak RSS 4.6x the live memory at
  // 4,096 tokens).
  bool retain_freed_memory = true;
  // Sharded run (not owned; outlives the Trainer): the model is cut over the
  // context's tp and ep groups, each call's batch is split over its data
  // shards by token count, and every rank returns the whole batch's output.
  // Every rank of the world then makes the same calls with the same input.
  parallel::ParallelContext* parallel = nullptr;
  // With `parallel`: each replica is given its own part of the batch (the
  // coordinator split it; a part may be empty). The part is split over the
  // replica's data groups, outputs are gathered inside the replica, and only
  // optim_step communicates across replicas. The ranks of one replica make
  // the same calls with the same input.
  bool replica_batches = false;
  // Logprobs and losses are computed this many tokens at a time from the
  // final hidden states, forward and backward, so no [T, V] logits tensor
  // exists for a longer micro-batch. 0: sized like micro_batch_tokens (fp32
  // logits of a chunk near 256 MiB).
  int64_t logprob_chunk_tokens = 0;
  // Keep only each decoder layer's input for the backward and run the layer
  // again inside it (DecoderModel::Hidden). Under kAuto the ranks that run
  // rounds together agree on the longest micro-batch, so they all decide alike.
  Recompute recompute = Recompute::kAuto;
  // The precision of the run's compute (core/dtype.h).
  Dtype dtype = Dtype::kFloat32;
  // The CUDA device this rank computes on (parallel::DeviceChoice::index);
  // -1: the CPU. The model, its gradients, the optimizer state and every
  // input then live there (runtime/device.h).
  int device = -1;
};

struct TrainerInfo {
  std::string model_dir;
  std::string architecture;
  LoraSettings lora;
  int64_t max_seq_len = 0;
  int64_t step = 0;              // optimizer steps taken
  int64_t trainable_parameters = 0;  // element count of the whole model, whatever the sharding
  Dtype dtype = Dtype::kFloat32;
};

class Trainer {
 public:
  // Loads the model. Errors as DecoderModel::Load.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const TrainerOptions& options);
  ~Trainer();

  // Logprobs and losses without touching gradients.
  absl::StatusOr<lathe::v1::ForwardBackwardOutput> Forward(const lathe::v1::ForwardBackwardInput& input);
  // As Forward, and adds the gradient of the summed loss to the accumulated
  // gradients. A refused call (InvalidArgument) changes nothing. A failure
  // inside the computation (Internal, ResourceExhausted) may leave the
  // gradients of the micro-batches that finished accumulated.
  absl::StatusOr<lathe::v1::ForwardBackwardOutput> ForwardBackward(
      const lathe::v1::ForwardBackwardInput& input);
  // Applies AdamW to the accumulated gradients and clears them. Metrics:
  // "grad_norm:mean", "learning_rate:mean", "step:max".
  absl::StatusOr<lathe::v1::OptimStepOutput> OptimStep(const lathe::v1::AdamParams& params);
  TrainerInfo GetInfo() const;

  DecoderModel& model();
  const DecoderModel& model() const;
  AdamW& optimizer();

 private:
  Trainer();
  int64_t MicroBatchTokens() const;
  int64_t LogprobChunkTokens() const;
  absl::StatusOr<lathe::v1::ForwardBackwardOutput> Run(const lathe::v1::ForwardBackwardInput& input,
                                                       bool backward);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_TRAINER_H_
