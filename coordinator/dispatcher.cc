// Dispatch loop: ledger -> replicas -> ledger.
#include "coordinator/dispatcher.h"

#include "coordinator/fan_out.h"
#include "runtime/op_error.h"

namespace lathe::coordinator {

Dispatcher::Dispatcher(OpLedger* ledger, ReplicaRegistry* registry, absl::Duration op_timeout)
    : ledger_(ledger), registry_(registry), op_timeout_(op_timeout) {}

Dispatcher::~Dispatcher() { Stop(); }

void Dispatcher::Start() { thread_ = std::thread([this] { Loop(); }); }

void Dispatcher::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void Dispatcher::AddRun(const lathe::v1::RunInfo& info) {
  absl::MutexLock lock(&mu_);
  runs_[info.run_id()] = info;
}

std::optional<lathe::v1::RunInfo> Dispatcher::Run(const std::string& run_id) const {
  absl::MutexLock lock(&mu_);
  auto it = runs_.find(run_id);
  if (it == runs_.end()) return std::nullopt;
  return it->second;
}

int Dispatcher::runs() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(runs_.size());
}

void Dispatcher::Loop() {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (stop_) return;
    }
    std::optional<ReadyOp> op = ledger_->WaitReady(absl::Milliseconds(200));
    if (op.has_value()) Execute(*op);
  }
}

void Dispatcher::Execute(const ReadyOp& op) {
  // Operations run one at a time, so an ordering point reached here has
  // every earlier operation finished; the replicas have nothing to do for it.
  if (op.request.op_case() == lathe::v1::SubmitRequest::kNoop) {
    lathe::v1::OpResult result;
    result.mutable_noop();
    ledger_->Complete(op.op_id, std::move(result));
    return;
  }
  const FanOut fan_out = SplitOp(op.request, registry_->expected());
  absl::StatusOr<std::vector<lathe::v1::TaskResult>> answers = registry_->RunOnAll(fan_out.tasks, op_timeout_);
  if (!answers.ok()) {
    ledger_->Fail(op.op_id, runtime::OpErrorFromStatus(answers.status()));
    return;
  }
  lathe::v1::OpError error;
  absl::StatusOr<lathe::v1::OpResult> result = MergeAnswers(op.request, fan_out, *answers, &error);
  if (!result.ok()) {
    ledger_->Fail(op.op_id, runtime::OpErrorFromStatus(result.status()));
  } else if (error.code() != 0) {
    ledger_->Fail(op.op_id, error);
  } else {
    Record(op.request, &*result);
    ledger_->Complete(op.op_id, *std::move(result));
  }
}

void Dispatcher::Record(const lathe::v1::SubmitRequest& op, lathe::v1::OpResult* result) {
  const lathe::v1::ModelSummary model = registry_->model();
  absl::MutexLock lock(&mu_);
  auto it = runs_.find(op.run_id());
  if (it == runs_.end()) return;
  lathe::v1::RunInfo& info = it->second;
  if (result->has_init()) {
    // The replicas know their shard; the deployment-wide facts come from here.
    lathe::v1::RunInfo* init = result->mutable_init();
    init->set_base_model(model.base_model());
    init->set_max_seq_len(model.max_seq_len());
    *init->mutable_layout() = registry_->layout();
    init->set_policy_version(info.policy_version());
    info = *init;
  } else if (result->has_optim_step()) {
    info.set_step(info.step() + 1);
  }
}

}  // namespace lathe::coordinator
