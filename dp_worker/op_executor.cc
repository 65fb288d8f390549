// Task execution on one rank: routes each operation to its run's Trainer.
#include "dp_worker/op_executor.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstring>
#include <deque>
#include <filesystem>
#include <optional>

#include "absl/strings/str_cat.h"
#include "parallel/communicator.h"
#include "parallel/data_parallel.h"
#include "parallel/model_parallel.h"
#include "runtime/adamw.h"
#include "runtime/checkpoint.h"
#include "core/checkpoint_path.h"
#include "core/lora_settings.h"
#include "runtime/decoder_model.h"
#include "runtime/generate.h"
#include "core/guarded.h"
#include "core/log.h"
#include "dp_worker/op_outcome.h"
#include "runtime/peft_export.h"
#include "core/validation.h"
#include "core/op_error.h"
#include "tensor/trainable_param.h"
#include "core/status.h"

namespace lathe::dp_worker {
namespace {

lathe::v1::LoraConfig LoraToProto(const runtime::LoraSettings& s) {
  lathe::v1::LoraConfig c;
  c.set_rank(static_cast<int32_t>(s.rank));
  c.set_alpha(s.alpha);
  c.set_seed(static_cast<int64_t>(s.seed));
  c.set_train_attn(s.train_attn);
  c.set_train_mlp(s.train_mlp);
  c.set_train_unembed(s.train_unembed);
  return c;
}

std::string OpName(const lathe::v1::SubmitRequest& op) {
  const google::protobuf::FieldDescriptor* field =
      op.GetDescriptor()->FindFieldByNumber(static_cast<int>(op.op_case()));
  return field == nullptr ? "operation" : field->name();
}

absl::Status NotInitialised(const std::string& run_id) {
  return absl::FailedPreconditionError(absl::StrCat("run ", run_id, " is not initialised on this replica"));
}

}  // namespace

OpExecutor::OpExecutor(ExecutorOptions options, parallel::ParallelContext* parallel)
    : options_(std::move(options)), parallel_(parallel) {}

OpExecutor::~OpExecutor() = default;

std::optional<std::string> SampleBatchKey(const lathe::v1::SubmitRequest& op) {
  if (op.op_case() != lathe::v1::SubmitRequest::kSample) return std::nullopt;
  return absl::StrCat(op.run_id(), "\n", op.sample().model_path(), "\n", op.sample().base() ? "base" : "");
}

lathe::v1::TaskResult OpExecutor::Answer(int64_t task_id, absl::StatusOr<lathe::v1::OpResult> result) const {
  lathe::v1::TaskResult answer;
  answer.set_task_id(task_id);
  if (parallel::CommunicationBroken()) {
    // A collective timed out: this replica cannot compute any more (see
    // parallel/communicator.h); the job ends after this answer.
    result = absl::UnavailableError(absl::StrCat(
        "replica lost: a collective timed out and the replica must restart (",
        result.ok() ? "after the operation finished" : result.status().message(), ")"));
  }
  if (result.ok()) {
    *answer.mutable_result() = std::move(*result);
  } else {
    *answer.mutable_error() = runtime::OpErrorFromStatus(result.status());
  }
  return answer;
}

lathe::v1::TaskResult OpExecutor::Execute(const lathe::v1::Task& task) {
  const lathe::v1::SubmitRequest& op = task.op();
  absl::StatusOr<lathe::v1::OpResult> result = Join(task);
  if (result.ok() && task.has_sync()) {
    result = runtime::Guarded("sync_state", [&] { return Sync(task.sync()); });
  } else if (result.ok()) {
    result = runtime::Guarded(OpName(op), [&] { return Run(op); });
  }
  // The op boundary: the replica's ranks report one outcome. A failure on
  // some ranks only, of an operation that changes the run, leaves the ranks'
  // states apart: the run then refuses work until it is re-initialised.
  const Outcome outcome = AgreeOutcome(result.status(), parallel_ == nullptr ? nullptr : parallel_->replica.get(),
                                       options_.collective_timeout);
  if (!outcome.status.ok()) {
    if (outcome.mixed && ChangesRunState(op)) {
      diverged_[op.run_id()] = absl::StrCat(OpName(op), " failed on some ranks only: ", outcome.status.message());
    }
    result = outcome.status;
  }
  return Answer(task.task_id(), std::move(result));
}

absl::StatusOr<lathe::v1::OpResult> OpExecutor::Join(const lathe::v1::Task& task) {
  const auto kind = task.op().op_case();
  // Sampling runs on one replica alone, with no cross-replica collective.
  if (!options_.join || !task.has_membership() || kind == lathe::v1::SubmitRequest::kSample ||
      kind == lathe::v1::SubmitRequest::kComputeLogprobs) {
    return lathe::v1::OpResult();
  }
  bool changed = false;
  absl::Status s = options_.join(task.membership(), &changed);
  if (!s.ok()) {
    return absl::Status(s.code(), absl::StrCat("forming the cross-replica groups of generation ",
                                               task.membership().generation(), ": ", s.message()));
  }
  if (changed) {
    // Gradients accumulated before a replica left lack its part: the step
    // starts over on every replica. (A joiner adds zeros: nothing is lost.)
    for (auto& [run_id, trainer] : trainers_) {
      bool any = false;
      for (runtime::TrainableParam& p : trainer->model().trainable()) {
        any = any || p.tensor.grad().defined();
        p.tensor.mutable_grad() = at::Tensor();
      }
      if (any) dropped_[run_id] = task.membership().generation();
    }
  }
  return lathe::v1::OpResult();
}

namespace {

absl::Status BroadcastBytes(parallel::Communicator& group, int root, std::string& bytes, absl::Duration timeout) {
  int64_t size = static_cast<int64_t>(bytes.size());
  LATHE_RETURN_IF_ERROR(group.Broadcast({&size, 1, parallel::ElemType::kInt64}, root, timeout));
  std::vector<int64_t> words((size + 7) / 8, 0);
  if (group.rank() == root) std::memcpy(words.data(), bytes.data(), bytes.size());
  if (!words.empty()) {
    LATHE_RETURN_IF_ERROR(group.Broadcast({words.data(), static_cast<int64_t>(words.size()), parallel::ElemType::kInt64},
                                          root, timeout));
  }
  bytes.assign(reinterpret_cast<const char*>(words.data()), size);
  return absl::OkStatus();
}

absl::Status BroadcastTensor(parallel::Communicator& group, int root, at::Tensor& t, absl::Duration timeout) {
  if (t.scalar_type() != at::kFloat || !t.is_contiguous() || !t.device().is_cpu()) {
    return absl::FailedPreconditionError("run state to broadcast is not contiguous float32 in host memory");
  }
  return group.Broadcast({t.data_ptr(), t.numel(), parallel::ElemType::kFloat32}, root, timeout);
}

// The trainer's weights, optimizer moments and step, as the root holds them.
absl::Status BroadcastRunState(runtime::Trainer& trainer, parallel::Communicator& group, int root,
                               absl::Duration timeout) {
  at::NoGradGuard no_grad;
  const bool source = group.rank() == root;
  std::vector<runtime::TrainableParam>& params = trainer.model().trainable();
  runtime::AdamW& adam = trainer.optimizer();
  int64_t head[3] = {adam.step(), static_cast<int64_t>(adam.states().size()), static_cast<int64_t>(params.size())};
  LATHE_RETURN_IF_ERROR(group.Broadcast({head, 3, parallel::ElemType::kInt64}, root, timeout));
  if (head[2] != static_cast<int64_t>(params.size())) {
    return absl::InternalError(absl::StrCat("the source replica's run has ", head[2], " parameters, this one ",
                                            params.size()));
  }
  for (runtime::TrainableParam& p : params) LATHE_RETURN_IF_ERROR(BroadcastTensor(group, root, p.tensor, timeout));
  if (head[1] == 0) {
    if (!source) adam.Reset();
  } else {
    if (head[1] != static_cast<int64_t>(params.size())) return absl::InternalError("optimizer state per parameter");
    std::vector<runtime::AdamW::State> states = adam.states();
    if (!source && states.size() != params.size()) {
      states.assign(params.size(), {});
      for (size_t i = 0; i < params.size(); ++i) {
        states[i].exp_avg = at::zeros_like(params[i].tensor);
        states[i].exp_avg_sq = at::zeros_like(params[i].tensor);
      }
    }
    std::vector<int64_t> steps(params.size());
    for (size_t i = 0; i < params.size(); ++i) steps[i] = states[i].step;
    LATHE_RETURN_IF_ERROR(group.Broadcast({steps.data(), static_cast<int64_t>(steps.size()), parallel::ElemType::kInt64},
                                          root, timeout));
    for (size_t i = 0; i < params.size(); ++i) {
      LATHE_RETURN_IF_ERROR(BroadcastTensor(group, root, states[i].exp_avg, timeout));
      LATHE_RETURN_IF_ERROR(BroadcastTensor(group, root, states[i].exp_avg_sq, timeout));
      states[i].step = steps[i];
      if (!source) states[i].param_bound = states[i].exp_avg_bound = states[i].exp_avg_sq_bound = -1;
    }
    if (!source) adam.Restore(head[0], std::move(states));
  }
  runtime::RefreshComputeCopies(params);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<lathe::v1::OpResult> OpExecutor::Sync(const lathe::v1::SyncState& sync) {
  parallel::Communicator* cross = options_.cross_group ? options_.cross_group() : nullptr;
  if (cross == nullptr || parallel_ == nullptr) {
    return absl::FailedPreconditionError("a state sync needs the cross-replica groups (dp_worker --replica_index)");
  }
  const int root = sync.source();
  if (root < 0 || root >= cross->size()) return absl::InvalidArgumentError(absl::StrCat("sync source ", root));
  const absl::Duration timeout = options_.collective_timeout;
  const absl::Time start = absl::Now();
  int64_t bytes = 0;
  for (const lathe::v1::RunInfo& run : sync.runs()) {
    // The source's LoRA config ("1" + LoraConfig), or nothing when it holds no such run.
    std::string config;
    if (cross->rank() == root) {
      if (auto it = trainers_.find(run.run_id()); it != trainers_.end()) {
        config = "1" + LoraToProto(it->second->GetInfo().lora).SerializeAsString();
      }
    }
    LATHE_RETURN_IF_ERROR(BroadcastBytes(*cross, root, config, timeout));
    if (config.empty()) {
      trainers_.erase(run.run_id());
      continue;
    }
    absl::Status made;
    if (!trainers_.count(run.run_id())) {
      lathe::v1::InitOp init;
      if (!init.mutable_lora()->ParseFromString(config.substr(1))) made = absl::InternalError("unreadable LoRA config");
      if (made.ok()) made = Init(run.run_id(), init).status();
    }
    if (!parallel::AllAgree(made.ok(), {parallel_->world.get(), timeout})) {
      if (!made.ok()) return made;
      return absl::UnavailableError(absl::StrCat("another replica could not create run ", run.run_id()));
    }
    runtime::Trainer& trainer = *trainers_.at(run.run_id());
    LATHE_RETURN_IF_ERROR(BroadcastRunState(trainer, *cross, root, timeout));
    diverged_.erase(run.run_id());
    for (const runtime::TrainableParam& p : trainer.model().trainable()) {
      bytes += p.tensor.numel() * 4 * (trainer.optimizer().states().empty() ? 1 : 3);
    }
  }
  LATHE_LOG(Info, "state of %d run(s) synced from replica %d: %.1f MiB of this rank's shards in %s", sync.runs_size(),
            root, static_cast<double>(bytes) / (1 << 20), absl::FormatDuration(absl::Now() - start));
  lathe::v1::OpResult result;
  result.mutable_noop();
  return result;
}

void OpExecutor::ExecuteBatch(const lathe::v1::TaskBatch& batch, const MoreTasks& more, const Answers& answer) {
  const std::optional<std::string> key = SampleBatchKey(batch.tasks(0).op());
  bool together = key.has_value();
  for (const lathe::v1::Task& task : batch.tasks()) together = together && SampleBatchKey(task.op()) == key;
  if (!together) {
    for (const lathe::v1::Task& task : batch.tasks()) answer(Execute(task));
    return;
  }
  const std::string& run_id = batch.tasks(0).op().run_id();
  auto it = trainers_.find(run_id);
  if (it == trainers_.end()) {
    for (const lathe::v1::Task& task : batch.tasks()) answer(Answer(task.task_id(), NotInitialised(run_id)));
    return;
  }
  std::deque<lathe::v1::Task> tasks(batch.tasks().begin(), batch.tasks().end());  // stable addresses
  std::vector<const lathe::v1::SampleOp*> ops;
  for (const lathe::v1::Task& task : tasks) ops.push_back(&task.op().sample());
  MoreSamples joining;
  if (more) {
    joining = [&](int decoding) {
      std::vector<const lathe::v1::SampleOp*> added;
      for (lathe::v1::Task& task : more(decoding)) {
        tasks.push_back(std::move(task));
        added.push_back(&tasks.back().op().sample());
      }
      return added;
    };
  }
  Sample(*it->second, run_id, ops, joining, [&](size_t k, absl::StatusOr<lathe::v1::OpResult> result) {
    answer(Answer(tasks[k].task_id(), std::move(result)));
  });
}

absl::StatusOr<lathe::v1::OpResult> OpExecutor::Init(const std::string& run_id, const lathe::v1::InitOp& op) {
  std::optional<runtime::CheckpointRef> from;
  runtime::LoraSettings settings;
  if (op.load_path().empty()) {
    LATHE_ASSIGN_OR_RETURN(settings, runtime::LoraSettingsFromProto(op.lora()));
  } else {
    // The checkpoint's own LoRA config, so its weights fit.
    if (options_.checkpoint_root.empty()) {
      return absl::FailedPreconditionError("this deployment has no checkpoint root (dp_worker --checkpoint_root)");
    }
    LATHE_ASSIGN_OR_RETURN(from, runtime::ParseCheckpointPath(op.load_path()));
    absl::StatusOr<runtime::LoraSettings> read =
        runtime::ReadCheckpointLora(runtime::CheckpointDir(options_.checkpoint_root, *from));
    LATHE_RETURN_IF_ERROR(AgreeBeforeLoad(read.status(), "read the checkpoint's LoRA config"));
    settings = *std::move(read);
  }
  if (options_.max_lora_rank > 0 && settings.rank > options_.max_lora_rank) {
    return absl::InvalidArgumentError(absl::StrCat("lora_config.rank ", settings.rank, " exceeds ",
                                                   options_.max_lora_rank, ", the model's hidden size"));
  }
  const int others = static_cast<int>(trainers_.size()) - static_cast<int>(trainers_.count(run_id));
  if (others >= options_.max_runs) {
    return absl::ResourceExhaustedError(absl::StrCat("this deployment holds at most ", options_.max_runs, " runs"));
  }
  // All or nothing: the new trainer is built beside the run's current one,
  // which stays (with its kept sampling weights) if the build fails.
  runtime::TrainerOptions o;
  o.model_dir = options_.model_dir;
  o.lora = settings;
  o.max_seq_len = options_.max_seq_len;
  o.micro_batch_tokens = options_.micro_batch_tokens;
  o.logprob_chunk_tokens = options_.logprob_chunk_tokens;
  o.recompute = options_.recompute;
  o.dtype = options_.dtype;
  o.parallel = parallel_;
  o.device = options_.device;
  o.replica_batches = true;
  absl::StatusOr<std::unique_ptr<runtime::Trainer>> trainer = runtime::Trainer::Create(o);
  if (!trainer.ok()) {
    if (from.has_value()) LATHE_RETURN_IF_ERROR(AgreeBeforeLoad(trainer.status(), "build the run's new state"));
    if (!trainers_.count(run_id)) return trainer.status();
    return absl::Status(trainer.status().code(),
                        absl::StrCat(trainer.status().message(),
                                     "; the run is unchanged (a re-initialisation builds its new state beside the "
                                     "current one: to free the memory first, delete the run and create a new one)"));
  }
  if (from.has_value()) {
    LATHE_RETURN_IF_ERROR(AgreeBeforeLoad(trainer.status(), "build the run's new state"));
    // Loaded before it replaces the run's trainer: a failed load leaves the run as it was.
    absl::StatusOr<int64_t> step = runtime::LoadCheckpoint(
        **trainer, runtime::CheckpointDir(options_.checkpoint_root, *from), op.load_optimizer(),
        parallel_ == nullptr ? nullptr : parallel_->world.get(), options_.collective_timeout);
    if (!step.ok()) return step.status();
  }
  const runtime::TrainerInfo info = (*trainer)->GetInfo();
  trainers_[run_id] = *std::move(trainer);
  diverged_.erase(run_id);
  // Its kept sampling weights may not fit the new config (published ones are
  // read back from disk, and checked, if asked).
  DropSnapshots(run_id);
  lathe::v1::OpResult result;
  lathe::v1::RunInfo* out = result.mutable_init();
  out->set_run_id(run_id);
  out->set_architecture(info.architecture);
  *out->mutable_lora() = LoraToProto(info.lora);
  out->set_max_seq_len(info.max_seq_len);
  out->set_step(info.step);
  out->set_trainable_parameters(info.trainable_parameters);
  out->set_dtype(runtime::DtypeName(info.dtype));
  out->set_loaded_from(op.load_path());
  return result;
}

absl::Status OpExecutor::AgreeBeforeLoad(const absl::Status& mine, const char* what) const {
  if (parallel_ == nullptr) return mine;
  if (parallel::AllAgree(mine.ok(), {parallel_->world.get(), options_.collective_timeout})) return absl::OkStatus();
  if (!mine.ok()) return mine;
  return absl::UnavailableError(absl::StrCat("another rank could not ", what, "; the run is unchanged"));
}

void OpExecutor::DropSnapshots(const std::string& run_id) {
  for (auto it = snapshots_.begin(); it != snapshots_.end();) {
    const bool mine = it->first == "base:" + run_id || it->first.rfind("lathe://" + run_id + "/", 0) == 0;
    it = mine ? snapshots_.erase(it) : std::next(it);
  }
}

absl::StatusOr<lathe::v1::OpResult> OpExecutor::Run(const lathe::v1::SubmitRequest& op) {
  if (op.op_case() == lathe::v1::SubmitRequest::kInit) return Init(op.run_id(), op.init());
  lathe::v1::OpResult result;
  if (op.op_case() == lathe::v1::SubmitRequest::kNoop) {
    result.mutable_noop();
    return result;
  }
  if (op.op_case() == lathe::v1::SubmitRequest::kDeleteRun) {
    // Also for a run whose init failed (it holds no trainer).
    trainers_.erase(op.run_id());
    diverged_.erase(op.run_id());
    DropSnapshots(op.run_id());
    result.mutable_delete_run();
    return result;
  }
  auto it = trainers_.find(op.run_id());
  if (it == trainers_.end()) return NotInitialised(op.run_id());
  if (auto d = diverged_.find(op.run_id()); d != diverged_.end()) {
    return absl::FailedPreconditionError(absl::StrCat("run ", op.run_id(), " must be re-initialised (init): ",
                                                      d->second));
  }
  runtime::Trainer& trainer = *it->second;
  switch (op.op_case()) {
    case lathe::v1::SubmitRequest::kForward: {
      LATHE_ASSIGN_OR_RETURN(*result.mutable_forward_backward(), trainer.Forward(op.forward()));
      return result;
    }
    case lathe::v1::SubmitRequest::kForwardBackward: {
      dropped_.erase(op.run_id());
      LATHE_ASSIGN_OR_RETURN(*result.mutable_forward_backward(), trainer.ForwardBackward(op.forward_backward()));
      return result;
    }
    case lathe::v1::SubmitRequest::kOptimStep: {
      if (auto d = dropped_.find(op.run_id()); d != dropped_.end()) {
        const int64_t generation = d->second;
        dropped_.erase(d);
        return absl::AbortedError(absl::StrCat(
            "the replicas changed (generation ", generation, ") after this step's forward_backward: its gradients "
            "were dropped on every replica; run the step's forward_backward again, then optim_step"));
      }
      LATHE_ASSIGN_OR_RETURN(*result.mutable_optim_step(), trainer.OptimStep(op.optim_step()));
      return result;
    }
    case lathe::v1::SubmitRequest::kSaveState:
      return Save(trainer, op);
    case lathe::v1::SubmitRequest::kSample: {
      absl::StatusOr<lathe::v1::OpResult> answer = absl::InternalError("not sampled");
      Sample(trainer, op.run_id(), {&op.sample()}, nullptr,
             [&](size_t, absl::StatusOr<lathe::v1::OpResult> r) { answer = std::move(r); });
      return answer;
    }
    case lathe::v1::SubmitRequest::kComputeLogprobs:
      return ComputeLogprobs(trainer, op.run_id(), op.compute_logprobs());
    case lathe::v1::SubmitRequest::kSaveWeightsForSampler:
      return SaveForSampler(trainer, op);
    case lathe::v1::SubmitRequest::kLoadState:
      return Load(trainer, op.load_state(), /*with_optimizer=*/false);
    case lathe::v1::SubmitRequest::kLoadStateWithOptimizer:
      return Load(trainer, op.load_state_with_optimizer(), /*with_optimizer=*/true);
    default:
      return absl::UnimplementedError(absl::StrCat("operation ", op.op_case(), " is not served by this worker"));
  }
}

absl::StatusOr<lathe::v1::OpResult> OpExecutor::Save(runtime::Trainer& trainer, const lathe::v1::SubmitRequest& op) {
  if (options_.checkpoint_root.empty()) {
    return absl::FailedPreconditionError("this deployment has no checkpoint root (dp_worker --checkpoint_root)");
  }
  const runtime::CheckpointRef ref{op.run_id(), op.save_state().name()};
  LATHE_RETURN_IF_ERROR(runtime::ValidateCheckpointName(ref.name));
  lathe::v1::OpResult result;
  result.mutable_save_state()->set_path(runtime::CheckpointUri(ref));
  // Replicas hold the same state: the first one writes it.
  if (parallel_ != nullptr && parallel_->place.replica != 0) return result;
  runtime::CheckpointMeta meta;
  meta.run_id = ref.run_id;
  meta.name = ref.name;
  meta.base_model = options_.base_model;
  meta.ttl_seconds = op.save_state().ttl_seconds();
  runtime::ShardPlace place;
  if (parallel_ != nullptr) {
    const parallel::MeshShape& s = parallel_->shape;
    meta.replicas = s.replicas, meta.node_count = s.node_count, meta.devices_per_node = s.devices_per_node;
    meta.tp = s.tp, meta.ep = s.ep, meta.cp = s.cp;
    place = {parallel_->place.node_rank, parallel_->place.local_rank};
  }
  LATHE_RETURN_IF_ERROR(runtime::SaveCheckpoint(trainer, runtime::CheckpointDir(options_.checkpoint_root, ref),
                                                op.save_state().overwrite(), meta, place,
                                                parallel_ == nullptr ? nullptr : parallel_->replica.get(),
                                                options_.collective_timeout));
  return result;
}

namespace {

template <typename T>
std::string Bytes(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

lathe::v1::OpResult SampleResultOf(const runtime::Generation& g, const lathe::v1::SampleOp& op) {
  lathe::v1::OpResult result;
  lathe::v1::SampleResult* out = result.mutable_sample();
  out->set_batched_requests(g.batched_requests);
  for (const runtime::GeneratedSequence& seq : g.sequences) {
    lathe::v1::SampledSequence* s_out = out->add_sequences();
    s_out->set_tokens(Bytes(seq.tokens));
    s_out->set_logprobs(Bytes(seq.logprobs));
    s_out->set_stop_reason(seq.stopped ? lathe::v1::STOP : lathe::v1::LENGTH);
  }
  if (op.include_prompt_logprobs()) out->set_prompt_logprobs(Bytes(g.prompt_logprobs));
  if (op.topk_prompt_logprobs() > 0) {
    lathe::v1::TopkPromptLogprobs* topk = out->mutable_topk_prompt_logprobs();
    topk->set_token_ids(Bytes(g.topk_ids));
    topk->set_logprobs(Bytes(g.topk_logprobs));
    topk->set_k(static_cast<uint32_t>(op.topk_prompt_logprobs()));
    topk->set_prompt_length(static_cast<uint32_t>(g.topk_ids.size() / op.topk_prompt_logprobs()));
  }
  return result;
}

// Puts other values into the trainable parameters for its lifetime.
class WeightSwap {
 public:
  WeightSwap(std::vector<runtime::TrainableParam>& params, const std::vector<at::Tensor>* values) : params_(params) {
    if (values == nullptr) return;
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < params_.size(); ++i) {
      saved_.push_back(params_[i].tensor.detach().clone());
      params_[i].tensor.detach().copy_((*values)[i]);
    }
    runtime::RefreshComputeCopies(params_);
  }
  ~WeightSwap() {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < saved_.size(); ++i) params_[i].tensor.detach().copy_(saved_[i]);
    if (!saved_.empty()) runtime::RefreshComputeCopies(params_);
  }

 private:
  std::vector<runtime::TrainableParam>& params_;
  std::vector<at::Tensor> saved_;
};

std::vector<at::Tensor> Snapshot(const std::vector<runtime::TrainableParam>& params) {
  std::vector<at::Tensor> out;
  for (const runtime::TrainableParam& p : params) out.push_back(p.tensor.detach().clone());
  return out;
}

}  // namespace

absl::StatusOr<const std::vector<at::Tensor>*> OpExecutor::SamplingWeights(runtime::Trainer& trainer,
                                                                           const std::string& run_id,
                                                                           const std::string& model_path, bool base) {
  const std::vector<runtime::TrainableParam>& params = trainer.model().trainable();
  if (base) {
    if (trainer.GetInfo().lora.full_finetune()) {
      return absl::FailedPreconditionError("a full fine-tuning run has no adapter to turn off");
    }
    auto [it, fresh] = snapshots_.try_emplace("base:" + run_id);
    if (fresh) {
      for (const runtime::TrainableParam& p : params) {
        // lora_B at zero: the adapter adds nothing.
        const bool b = p.name.find("lora_B") != std::string::npos;
        it->second.push_back(b ? at::zeros_like(p.tensor).detach() : p.tensor.detach().clone());
      }
    }
    return &it->second;
  }
  if (model_path.empty()) return nullptr;
  auto it = snapshots_.find(model_path);
  // Kept weights of another run serve only if they fit this run's parameters;
  // otherwise the checkpoint on disk is read (its LoRA config checked).
  bool fits = it != snapshots_.end() && it->second.size() == params.size();
  for (size_t i = 0; fits && i < params.size(); ++i) fits = it->second[i].sizes() == params[i].tensor.sizes();
  if (fits) return &it->second;
  LATHE_ASSIGN_OR_RETURN(runtime::CheckpointRef ref, runtime::ParseCheckpointPath(model_path, /*allow_sampler=*/true));
  const std::string dir = runtime::CheckpointDir(options_.checkpoint_root, ref) + "/lathe";
  absl::StatusOr<std::vector<at::Tensor>> values = runtime::ReadCheckpointParams(trainer, dir);
  if (absl::IsNotFound(values.status())) {
    return absl::NotFoundError(absl::StrCat("no sampler weights ", model_path));
  }
  if (!values.ok()) return values.status();
  return &(snapshots_[model_path] = *std::move(values));
}

void OpExecutor::Sample(runtime::Trainer& trainer, const std::string& run_id,
                        const std::vector<const lathe::v1::SampleOp*>& ops, const MoreSamples& more,
                        const SampleAnswer& answer) {
  absl::StatusOr<const std::vector<at::Tensor>*> weights =
      SamplingWeights(trainer, run_id, ops[0]->model_path(), ops[0]->base());
  if (!weights.ok()) {
    for (size_t k = 0; k < ops.size(); ++k) answer(k, weights.status());
    return;
  }
  // Requests as the decoder numbers them: their number here and their op.
  std::vector<size_t> ours;
  std::vector<const lathe::v1::SampleOp*> specs;
  std::vector<bool> answered;  // by request number
  auto reply = [&](size_t k, absl::StatusOr<lathe::v1::OpResult> result) {
    answered[k] = true;
    answer(k, std::move(result));
  };
  // The decoder's requests from ops; refused ones are answered at once.
  auto requests = [&](const std::vector<const lathe::v1::SampleOp*>& batch) {
    std::vector<runtime::SampleRequest> out;
    for (const lathe::v1::SampleOp* op : batch) {
      const size_t k = answered.size();
      answered.push_back(false);
      absl::StatusOr<std::vector<int32_t>> prompt = runtime::InputTokens(op->prompt());
      absl::StatusOr<runtime::SamplingSettings> settings = runtime::SamplingSettingsFromProto(op->params());
      if (!prompt.ok() || !settings.ok()) {
        reply(k, prompt.ok() ? settings.status() : prompt.status());
        continue;
      }
      runtime::SampleRequest r;
      r.prompt = *std::move(prompt);
      r.settings = *std::move(settings);
      r.num_samples = op->num_samples();
      r.prompt_logprobs = op->include_prompt_logprobs();
      r.topk_prompt_logprobs = op->topk_prompt_logprobs();
      out.push_back(std::move(r));
      ours.push_back(k);
      specs.push_back(op);
    }
    return out;
  };
  runtime::DecodeHooks hooks;
  if (more) hooks.join = [&](int decoding) { return requests(more(decoding)); };
  hooks.done = [&](size_t j, absl::StatusOr<runtime::Generation> g) {
    reply(ours[j], g.ok() ? SampleResultOf(*g, *specs[j]) : absl::StatusOr<lathe::v1::OpResult>(g.status()));
  };
  const absl::Status failed = runtime::Guarded("sample", [&] {
    WeightSwap swap(trainer.model().trainable(), *weights);
    runtime::Decode(trainer.model(), requests(ops), trainer.GetInfo().max_seq_len, hooks);
    return absl::OkStatus();
  });
  for (size_t k = 0; k < answered.size(); ++k) {
    if (!answered[k]) reply(k, failed.ok() ? absl::InternalError("sample: the decode ended without an answer") : failed);
  }
}

absl::StatusOr<lathe::v1::OpResult> OpExecutor::ComputeLogprobs(runtime::Trainer& trainer, const std::string& run_id,
                                                                const lathe::v1::ComputeLogprobsOp& op) {
  LATHE_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, runtime::InputTokens(op.prompt()));
  LATHE_ASSIGN_OR_RETURN(const std::vector<at::Tensor>* weights,
                         SamplingWeights(trainer, run_id, op.model_path(), op.base()));
  absl::StatusOr<std::vector<float>> logprobs = runtime::Guarded("compute_logprobs", [&] {
    WeightSwap swap(trainer.model().trainable(), weights);
    return runtime::PromptLogprobs(trainer.model(), prompt);
  });
  if (!logprobs.ok()) return logprobs.status();
  lathe::v1::OpResult result;
  result.mutable_compute_logprobs()->set_logprobs(Bytes(*logprobs));
  return result;
}

absl::StatusOr<lathe::v1::OpResult> OpExecutor::SaveForSampler(runtime::Trainer& trainer,
                                                               const lathe::v1::SubmitRequest& op) {
  if (options_.checkpoint_root.empty()) {
    return absl::FailedPreconditionError("this deployment has no checkpoint root (dp_worker --checkpoint_root)");
  }
  const std::string& name = op.save_weights_for_sampler().name();
  LATHE_RETURN_IF_ERROR(runtime::ValidateCheckpointName(name));
  const std::string folder = absl::StrCat(options_.checkpoint_root, "/", op.run_id(), "/sampler_weights/", name);
  lathe::v1::OpResult result;
  const std::string uri = absl::StrCat("lathe://", op.run_id(), "/sampler_weights/", name);
  result.mutable_save_weights_for_sampler()->set_path(uri);
  result.mutable_save_weights_for_sampler()->set_step(trainer.GetInfo().step);
  // Every replica keeps these weights for sampling pinned to them.
  snapshots_[uri] = Snapshot(trainer.model().trainable());
  if (parallel_ != nullptr && parallel_->place.replica != 0) return result;
  // The shards go to a scratch checkpoint; the first rank assembles the adapter from it.
  runtime::CheckpointMeta meta;
  meta.run_id = op.run_id();
  meta.name = name;
  meta.base_model = options_.base_model;
  meta.with_optimizer = false;
  runtime::ShardPlace place;
  if (parallel_ != nullptr) place = {parallel_->place.node_rank, parallel_->place.local_rank};
  parallel::Communicator* group = parallel_ == nullptr ? nullptr : parallel_->replica.get();
  const std::string scratch = folder + ".shards";
  LATHE_RETURN_IF_ERROR(runtime::SaveCheckpoint(trainer, scratch, /*overwrite=*/true, meta, place, group,
                                                options_.collective_timeout));
  absl::Status s;
  if (group == nullptr || group->rank() == 0) {
    absl::StatusOr<std::map<std::string, at::Tensor>> params = runtime::ReadCheckpointTensors(scratch, "param");
    // The shards go in as <folder>/lathe before the export appears, so any
    // layout can sample from them later.
    runtime::PeftExportOptions export_options;
    export_options.base_model = options_.base_model;
    export_options.merge_base_dir = op.save_weights_for_sampler().merged() ? options_.model_dir : "";
    export_options.merged_bf16 = options_.dtype == runtime::Dtype::kBFloat16;
    export_options.ttl_seconds = op.save_weights_for_sampler().ttl_seconds();
    export_options.shards_dir = scratch;
    s = params.ok() ? runtime::WritePeftAdapter(*params, trainer.GetInfo().lora, folder, export_options)
                    : params.status();
    std::error_code ec;
    if (!s.ok()) std::filesystem::remove_all(scratch, ec);
  }
  if (group != nullptr) s = parallel::AgreeStatus(s, *group, options_.collective_timeout);
  if (!s.ok()) snapshots_.erase(uri);
  LATHE_RETURN_IF_ERROR(s);
  return result;
}

absl::StatusOr<lathe::v1::OpResult> OpExecutor::Load(runtime::Trainer& trainer, const lathe::v1::LoadStateOp& op,
                                                     bool with_optimizer) {
  if (options_.checkpoint_root.empty()) {
    return absl::FailedPreconditionError("this deployment has no checkpoint root (dp_worker --checkpoint_root)");
  }
  LATHE_ASSIGN_OR_RETURN(runtime::CheckpointRef ref, runtime::ParseCheckpointPath(op.path()));
  LATHE_ASSIGN_OR_RETURN(int64_t step, runtime::LoadCheckpoint(trainer, runtime::CheckpointDir(options_.checkpoint_root, ref),
                                                               with_optimizer,
                                                               parallel_ == nullptr ? nullptr : parallel_->world.get(),
                                                               options_.collective_timeout));
  lathe::v1::OpResult result;
  result.mutable_load_state()->set_path(op.path());
  result.mutable_load_state()->set_step(step);
  return result;
}

}  // namespace lathe::dp_worker
