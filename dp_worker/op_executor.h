// Executes the training operations of a replica's tasks on this rank: one
// Trainer per run, created by the run's init operation. Every rank of a
// replica executes the same tasks in the same order (cross-rank rule of the
// Trainer); a task's answer is the same on every rank of the replica.
//
// Not thread-safe: the thread that owns the model calls it.
#ifndef LATHE_DP_WORKER_OP_EXECUTOR_H_
#define LATHE_DP_WORKER_OP_EXECUTOR_H_

#include <ATen/core/Tensor.h>

#include <functional>
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
  int64_t logprob_chunk_tokens = 0;  // 0: the Trainer's default
  runtime::Recompute recompute = runtime::Recompute::kAuto;
  runtime::Dtype dtype = runtime::Dtype::kFloat32;
  int max_runs = 1;                // trainers held at once
  std::string checkpoint_root;     // empty: save/load refused
  std::string base_model;          // recorded in checkpoints
  absl::Duration collective_timeout = absl::Minutes(10);
  int64_t max_lora_rank = 0;       // 0: no bound beyond LoraSettingsFromProto's
  int device = -1;                 // CUDA device of this rank (runtime::ComputeDevice); -1: CPU
  // Replicas in separate jobs: forms the cross-replica groups of a task's
  // membership before an operation every replica runs (collective over the
  // replica; CrossReplicaGroups::Join). Null: one job holds every replica.
  std::function<absl::Status(const lathe::v1::Membership&, bool* changed)> join;
  // This rank's group among the ranks at its place in every replica of the
  // current generation (after join), over which a joining replica receives
  // the runs' state; null with join.
  std::function<parallel::Communicator*()> cross_group;
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
  // No exception leaves it, and every rank of the replica returns the same
  // outcome (collective over the replica, see op_outcome.h).
  lathe::v1::TaskResult Execute(const lathe::v1::Task& task);
  // Tasks that join a running decode, given the samples still decoding
  // (every rank of the replica must get the same ones at the same step).
  using MoreTasks = std::function<std::vector<lathe::v1::Task>(int decoding)>;
  using Answers = std::function<void(lathe::v1::TaskResult)>;
  // Runs the batch, answering each task through `answer` as soon as it is
  // finished. Sampling requests of one SampleBatchKey decode together
  // (runtime::Decode), and `more` (may be null) is asked after every decode
  // step for tasks of the same key that join; other tasks run one by one.
  void ExecuteBatch(const lathe::v1::TaskBatch& batch, const MoreTasks& more, const Answers& answer);

 private:
  absl::StatusOr<lathe::v1::OpResult> Run(const lathe::v1::SubmitRequest& op);
  // Forms the task's cross-replica groups when it needs them (an empty
  // result: go on), dropping the runs' gradients when the replicas changed.
  absl::StatusOr<lathe::v1::OpResult> Join(const lathe::v1::Task& task);
  // A joining replica's catch-up (Task.sync): every run the source replica
  // holds is created where missing and its weights and optimizer state are
  // broadcast from the source; collective over the generation's replicas.
  absl::StatusOr<lathe::v1::OpResult> Sync(const lathe::v1::SyncState& sync);
  absl::StatusOr<lathe::v1::OpResult> Init(const std::string& run_id, const lathe::v1::InitOp& op);
  absl::StatusOr<lathe::v1::OpResult> Save(runtime::Trainer& trainer, const lathe::v1::SubmitRequest& op);
  // The weights a sampling request names (see SampleOp): null for the run's
  // current weights, else values for every trainable parameter.
  absl::StatusOr<const std::vector<at::Tensor>*> SamplingWeights(runtime::Trainer& trainer, const std::string& run_id,
                                                                 const std::string& model_path, bool base);
  // Decodes sampling requests that share their weights, and those `more`
  // adds while they decode; request k (given first, then joined) is answered
  // through `answer` when it is finished.
  using MoreSamples = std::function<std::vector<const lathe::v1::SampleOp*>(int decoding)>;
  using SampleAnswer = std::function<void(size_t k, absl::StatusOr<lathe::v1::OpResult>)>;
  void Sample(runtime::Trainer& trainer, const std::string& run_id, const std::vector<const lathe::v1::SampleOp*>& ops,
              const MoreSamples& more, const SampleAnswer& answer);
  // Forgets the sampling weights kept for `run_id`.
  // Whether every rank of the world got `mine` OK before a collective
  // checkpoint load (collective; alone: `mine`). Not OK when any rank did not:
  // its own error, or UNAVAILABLE saying another rank could not do `what`.
  absl::Status AgreeBeforeLoad(const absl::Status& mine, const char* what) const;
  void DropSnapshots(const std::string& run_id);
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
  // Runs whose ranks may hold different states after an operation that
  // failed on some of them only, with why; cleared by a successful init.
  std::map<std::string, std::string> diverged_;
  // Runs whose gradients of an unfinished step were dropped because a
  // replica left since they were computed: the generation; cleared by their
  // next forward_backward.
  std::map<std::string, int64_t> dropped_;
};

}  // namespace lathe::dp_worker

#endif  // LATHE_DP_WORKER_OP_EXECUTOR_H_
