// Executes the training operations of a replica's tasks on this rank: one
// Trainer per run, created by the run's init operation. Every rank of a
// replica executes the same tasks in the same order (cross-rank rule of the
// Trainer); a task's answer is the same on every rank of the replica.
//
// Not thread-safe: the thread that owns the model calls it.
#ifndef LATHE_DP_WORKER_OP_EXECUTOR_H_
#define LATHE_DP_WORKER_OP_EXECUTOR_H_

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lathe/v1/replica.pb.h"
#include "parallel/context.h"
#include "runtime/trainer.h"

namespace lathe::dp_worker {

struct ExecutorOptions {
  std::string model_dir;
  int64_t max_seq_len = 0;         // 0: the model's
  int64_t micro_batch_tokens = 0;  // 0: the Trainer's default
  int max_runs = 1;                // trainers held at once
  std::string checkpoint_root;     // empty: save/load refused
  std::string base_model;          // recorded in checkpoints
  absl::Duration collective_timeout = absl::Minutes(10);
};

// Sampling requests with equal keys may decode in one batch: the same run
// and the same weights. nullopt for other operations.
std::optional<std::string> SampleBatchKey(const lathe::v1::SubmitRequest& op);

class OpExecutor {
 public:
  // `parallel` is not owned and outlives the executor.
  OpExecutor(ExecutorOptions options, parallel::ParallelContext* parallel);
  ~OpExecutor();

  // Runs the task and returns its answer: a result, or an error with its
  // category (USER for refused input, SERVER for failures of the replica).
  lathe::v1::TaskResult Execute(const lathe::v1::Task& task);
  // One answer per task, in order. Sampling requests of one SampleBatchKey
  // decode together (runtime::GenerateBatch); other tasks run one by one.
  std::vector<lathe::v1::TaskResult> ExecuteBatch(const lathe::v1::TaskBatch& batch);

 private:
  absl::StatusOr<lathe::v1::OpResult> Run(const lathe::v1::SubmitRequest& op);
  absl::StatusOr<lathe::v1::OpResult> Init(const std::string& run_id, const lathe::v1::LoraConfig& lora);
  absl::StatusOr<lathe::v1::OpResult> Save(runtime::Trainer& trainer, const lathe::v1::SubmitRequest& op);
  // The weights a sampling request names (see SampleOp): null for the run's
  // current weights, else values for every trainable parameter.
  absl::StatusOr<const std::vector<at::Tensor>*> SamplingWeights(runtime::Trainer& trainer, const std::string& run_id,
                                                                 const std::string& model_path, bool base);
  // The answers to sampling requests that share their weights.
  std::vector<absl::StatusOr<lathe::v1::OpResult>> Sample(runtime::Trainer& trainer, const std::string& run_id,
                                                          const std::vector<const lathe::v1::SampleOp*>& ops);
  lathe::v1::TaskResult Answer(int64_t task_id, absl::StatusOr<lathe::v1::OpResult> result) const;
  absl::StatusOr<lathe::v1::OpResult> ComputeLogprobs(runtime::Trainer& trainer, const std::string& run_id,
                                                      const lathe::v1::ComputeLogprobsOp& op);
  absl::StatusOr<lathe::v1::OpResult> SaveForSampler(runtime::Trainer& trainer, const lathe::v1::SubmitRequest& op);
  absl::StatusOr<lathe::v1::OpResult> Load(runtime::Trainer& trainer, const lathe::v1::LoadStateOp& op,
                                           bool with_optimizer);

  ExecutorOptions options_;
  parallel::ParallelContext* parallel_;
  std::map<std::string, std::unique_ptr<runtime::Trainer>> trainers_;
  // Published sampler weights by lathe://…/sampler_weights/<name> (kept from
  // save_weights_for_sampler, or read from the checkpoint on first use), and
  // the adapter-off weights of each run ("base:<run_id>").
  std::map<std::string, std::vector<at::Tensor>> snapshots_;
};

}  // namespace lathe::dp_worker

#endif  // LATHE_DP_WORKER_OP_EXECUTOR_H_
