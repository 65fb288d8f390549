// Dispatch loop: ledger -> replicas -> ledger.
#include "coordinator/dispatcher.h"

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/op_error.h"

namespace lathe::coordinator {

Dispatcher::Dispatcher(OpLedger* ledger, ReplicaRegistry* registry, absl::Duration op_timeout, int depth,
                       int sampling_depth)
    : ledger_(ledger),
      registry_(registry),
      op_timeout_(op_timeout),
      depth_(std::max(1, depth)),
      sampling_depth_(std::max<size_t>(depth_, sampling_depth)) {}

Dispatcher::~Dispatcher() { Stop(); }

void Dispatcher::Start() {
  sender_ = std::thread([this] { SendLoop(); });
  collector_ = std::thread([this] { CollectLoop(); });
}

void Dispatcher::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (sender_.joinable()) sender_.join();
  if (collector_.joinable()) collector_.join();
}

void Dispatcher::AddRun(const lathe::v1::RunInfo& info) {
  absl::MutexLock lock(&mu_);
  runs_[info.run_id()] = info;
}

void Dispatcher::RestoreRun(const lathe::v1::JournalRun& run) {
  if (run.deleted()) return;
  absl::MutexLock lock(&mu_);
  runs_[run.run_id()] = run.info();
  policy_paths_[run.run_id()].assign(run.policy_paths().begin(), run.policy_paths().end());
  followed_from_[run.run_id()] = static_cast<size_t>(run.followed_from());
}

lathe::v1::JournalRun Dispatcher::StateLocked(const std::string& run_id) const {
  lathe::v1::JournalRun state;
  state.set_run_id(run_id);
  auto it = runs_.find(run_id);
  if (it == runs_.end()) {
    state.set_deleted(true);
    return state;
  }
  *state.mutable_info() = it->second;
  if (auto p = policy_paths_.find(run_id); p != policy_paths_.end()) {
    for (const std::string& path : p->second) state.add_policy_paths(path);
  }
  if (auto f = followed_from_.find(run_id); f != followed_from_.end()) {
    state.set_followed_from(static_cast<int64_t>(f->second));
  }
  return state;
}

int Dispatcher::Recover() {
  int settled = 0;
  for (ReadyOp& op : ledger_->Recovered()) {
    if (op.request.op_case() == lathe::v1::SubmitRequest::kNoop) continue;  // an ordering point: just again
    const FanOut fan_out = SplitOp(op.request, registry_->expected());
    std::vector<lathe::v1::TaskResult> answers;
    int meant = 0, answered = 0;
    for (int i = 0; i < registry_->expected(); ++i) {
      if (fan_out.tasks[i].op().op_case() == lathe::v1::SubmitRequest::OP_NOT_SET) {
        answers.emplace_back().set_task_id(-1);
        continue;
      }
      ++meant;
      std::optional<lathe::v1::TaskResult> kept = registry_->Kept(i, op.op_id);
      if (kept.has_value()) ++answered, answers.push_back(*std::move(kept));
    }
    if (answered == 0) {
      LATHE_LOG(Info, "op %s had not run when the coordinator restarted: it runs now", op.op_id);
      continue;
    }
    ++settled;
    if (answered < meant) {
      LATHE_LOG(Warning, "op %s ran on %d of its %d replicas before the coordinator restarted: failed", op.op_id,
                answered, meant);
      ledger_->Settle(op.op_id, nullptr,
                      runtime::MakeOpError(lathe::v1::OpError::SERVER, absl::StatusCode::kAborted,
                                           absl::StrCat("the coordinator restarted while op ", op.op_id,
                                                        " was on the replicas, and only ", answered, " of ", meant,
                                                        " replicas ran it")));
      continue;
    }
    lathe::v1::OpError error;
    absl::StatusOr<lathe::v1::OpResult> result = MergeAnswers(op.request, fan_out, answers, &error);
    if (!result.ok()) {
      ledger_->Settle(op.op_id, nullptr, runtime::OpErrorFromStatus(result.status()));
    } else if (error.code() != 0) {
      ledger_->Settle(op.op_id, nullptr, error);
    } else {
      std::optional<lathe::v1::JournalRun> state = Record(op.request, &*result);
      Observe(op, &*result, absl::Now());
      ledger_->Settle(op.op_id, &*result, error, state ? &*state : nullptr);
    }
    LATHE_LOG(Info, "op %s ran before the coordinator restarted: its answer is recorded", op.op_id);
  }
  registry_->ForgetKept();
  return settled;
}

std::optional<lathe::v1::RunInfo> Dispatcher::Run(const std::string& run_id) const {
  absl::MutexLock lock(&mu_);
  auto it = runs_.find(run_id);
  if (it == runs_.end()) return std::nullopt;
  return it->second;
}

std::vector<lathe::v1::RunInfo> Dispatcher::Runs() const {
  absl::MutexLock lock(&mu_);
  std::vector<lathe::v1::RunInfo> out;
  out.reserve(runs_.size());
  for (const auto& [id, info] : runs_) out.push_back(info);
  return out;
}

std::optional<std::string> Dispatcher::PolicyPath(const std::string& run_id, int64_t version) const {
  absl::MutexLock lock(&mu_);
  auto it = policy_paths_.find(run_id);
  if (it == policy_paths_.end() || version < 1 || version > static_cast<int64_t>(it->second.size())) return std::nullopt;
  return it->second[version - 1];
}

int Dispatcher::runs() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(runs_.size());
}

bool Dispatcher::WaitForRoom(size_t limit) {
  absl::MutexLock lock(&mu_);
  auto room = [this, limit]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stop_ || in_flight_.size() < limit; };
  mu_.Await(absl::Condition(&room));
  if (stop_) sender_done_ = true;
  return !stop_;
}

bool Dispatcher::FollowNewestVersion(lathe::v1::SubmitRequest& op) {
  std::string* path = nullptr;
  if (op.has_sample()) {
    const lathe::v1::SampleOp& s = op.sample();
    if (s.model_path().empty() && s.policy_version() == 0 && !s.base() && !s.current_weights()) {
      path = op.mutable_sample()->mutable_model_path();
    }
  } else if (op.has_compute_logprobs()) {
    const lathe::v1::ComputeLogprobsOp& c = op.compute_logprobs();
    if (c.model_path().empty() && c.policy_version() == 0 && !c.base() && !c.current_weights()) {
      path = op.mutable_compute_logprobs()->mutable_model_path();
    }
  }
  if (path == nullptr) return true;
  absl::MutexLock lock(&mu_);
  const std::string& run = op.run_id();
  auto settled = [this, &run]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    auto it = publishing_.find(run);
    return stop_ || it == publishing_.end() || it->second == 0;
  };
  mu_.Await(absl::Condition(&settled));
  if (stop_) {
    sender_done_ = true;
    return false;
  }
  auto it = policy_paths_.find(run);
  if (it != policy_paths_.end() && it->second.size() > followed_from_[run]) *path = it->second.back();
  return true;
}

void Dispatcher::SendLoop() {
  for (;;) {
    // Room for a sampling request; another operation waits for more below.
    if (!WaitForRoom(sampling_depth_)) return;
    std::optional<ReadyOp> op = ledger_->WaitReady(absl::Milliseconds(200));
    if (!op.has_value()) continue;
    const auto kind = op->request.op_case();
    const bool sampling =
        kind == lathe::v1::SubmitRequest::kSample || kind == lathe::v1::SubmitRequest::kComputeLogprobs;
    if ((!sampling && !WaitForRoom(depth_)) || (sampling && !FollowNewestVersion(op->request))) {
      ledger_->Fail(op->op_id, runtime::OpErrorFromStatus(absl::UnavailableError("the coordinator is stopping")));
      return;
    }
    if (kind == lathe::v1::SubmitRequest::kSaveWeightsForSampler) {
      absl::MutexLock lock(&mu_);
      ++publishing_[op->request.run_id()];
    }
    AdmitJoiners();
    InFlight entry;
    // An ordering point needs no replica work: it completes when every
    // operation sent before it has been collected (at once when none is out).
    if (op->request.op_case() == lathe::v1::SubmitRequest::kNoop) {
      absl::MutexLock lock(&mu_);
      if (in_flight_.empty()) {
        Finish(*op);
        continue;
      }
    } else {
      // Split over the replicas live when it is sent (for replicas in
      // separate jobs, fewer after one left).
      absl::StatusOr<std::vector<int64_t>> ids = registry_->SendSplit([&](int members) {
        entry.fan_out = SplitOp(op->request, members);
        for (lathe::v1::Task& task : entry.fan_out.tasks) task.set_op_id(op->op_id);
        return entry.fan_out.tasks;
      });
      if (ids.ok()) entry.task_ids = *std::move(ids);
      else entry.send_status = ids.status();
      if (ids.ok() && observer_ != nullptr) observer_->Sent(*op, absl::Now());
      entry.fan_out.tasks.clear();  // sent; keep only the datum split
    }
    entry.op = *std::move(op);
    entry.sent = absl::Now();
    entry.sampling = sampling;
    absl::MutexLock lock(&mu_);
    in_flight_.push_back(std::move(entry));
  }
}

void Dispatcher::AdmitJoiners() {
  if (!registry_->joiners()) return;
  std::vector<int> admitted;
  absl::StatusOr<std::vector<int64_t>> ids = registry_->AdmitJoiners(Runs(), &admitted);
  if (!ids.ok() || ids->empty()) return;
  // The sync runs after what the members were sent before it.
  absl::StatusOr<std::vector<lathe::v1::TaskResult>> answers = registry_->Collect(*ids, op_timeout_);
  std::string why;
  if (!answers.ok()) why = std::string(answers.status().message());
  for (size_t k = 0; answers.ok() && k < answers->size() && why.empty(); ++k) {
    if ((*answers)[k].has_error()) why = (*answers)[k].error().message();
  }
  if (why.empty()) {
    LATHE_LOG(Info, "replica(s) joined with the state of every run (%d runs)", static_cast<int>(Runs().size()));
    return;
  }
  for (int i : admitted) registry_->Expel(i, absl::StrCat("could not catch up: ", why));
}

std::optional<Dispatcher::InFlight> Dispatcher::NextToFinish() {
  for (;;) {
    std::vector<std::vector<int64_t>> sets;  // [0]: the oldest's; then sampling ones'
    std::vector<size_t> at;
    absl::Time deadline;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return !in_flight_.empty() || sender_done_; };
      mu_.Await(absl::Condition(&ready));
      if (in_flight_.empty()) return std::nullopt;  // the sender stopped and everything sent was collected
      // Nothing sent (an ordering point, a failed send): due now.
      if (in_flight_.front().task_ids.empty()) {
        InFlight entry = std::move(in_flight_.front());
        in_flight_.pop_front();
        return entry;
      }
      deadline = in_flight_.front().sent + op_timeout_;
      for (size_t i = 0; i < in_flight_.size(); ++i) {
        if (i == 0 || (in_flight_[i].sampling && !in_flight_[i].task_ids.empty())) {
          sets.push_back(in_flight_[i].task_ids);
          at.push_back(i);
        }
      }
    }
    const absl::Duration wait =
        std::min(absl::Milliseconds(100), std::max(absl::ZeroDuration(), deadline - absl::Now()));
    const int found = registry_->AwaitAnswered(sets, wait);
    if (found < 0 && absl::Now() < deadline) continue;  // look again: more may have been sent
    // Only this thread removes entries, so `at` still points where it did.
    absl::MutexLock lock(&mu_);
    const size_t index = at[std::max(found, 0)];
    InFlight entry = std::move(in_flight_[index]);
    in_flight_.erase(in_flight_.begin() + static_cast<std::ptrdiff_t>(index));
    return entry;
  }
}

void Dispatcher::CollectLoop() {
  while (std::optional<InFlight> entry = NextToFinish()) {
    // Answers are in (or the oldest's time is up: DeadlineExceeded at once).
    Finish(*entry, absl::ZeroDuration());
  }
}

void Dispatcher::Finish(const ReadyOp& op) {
  lathe::v1::OpResult result;
  result.mutable_noop();
  ledger_->Complete(op.op_id, std::move(result));
}

void Dispatcher::Finish(InFlight& entry, absl::Duration timeout) {
  FinishEntry(entry, timeout);
  if (entry.op.request.op_case() == lathe::v1::SubmitRequest::kSaveWeightsForSampler) {
    absl::MutexLock lock(&mu_);
    --publishing_[entry.op.request.run_id()];  // recorded (or failed): later requests may follow it
  }
}

void Dispatcher::Observe(const ReadyOp& op, const lathe::v1::OpResult* result, absl::Time sent) {
  if (observer_ != nullptr) observer_->Finished(op, result, sent, absl::Now(), Run(op.request.run_id()));
}

void Dispatcher::FinishEntry(InFlight& entry, absl::Duration timeout) {
  const ReadyOp& op = entry.op;
  if (op.request.op_case() == lathe::v1::SubmitRequest::kNoop) return Finish(op);
  if (!entry.send_status.ok()) {
    ledger_->Fail(op.op_id, runtime::OpErrorFromStatus(entry.send_status));
    return Observe(op, nullptr, entry.sent);
  }
  absl::StatusOr<std::vector<lathe::v1::TaskResult>> answers = registry_->Collect(entry.task_ids, timeout);
  if (!answers.ok()) {
    ledger_->Fail(op.op_id, runtime::OpErrorFromStatus(answers.status()));
    return Observe(op, nullptr, entry.sent);
  }
  lathe::v1::OpError error;
  absl::StatusOr<lathe::v1::OpResult> result = MergeAnswers(op.request, entry.fan_out, *answers, &error);
  if (!result.ok()) {
    ledger_->Fail(op.op_id, runtime::OpErrorFromStatus(result.status()));
  } else if (error.code() != 0) {
    ledger_->Fail(op.op_id, error);
  } else {
    std::optional<lathe::v1::JournalRun> state = Record(op.request, &*result);
    // Observed before the client can see the result, so metrics scraped
    // after a result include it. A crash between the history line and the
    // ledger's record makes the restarted coordinator settle the op again
    // and write its line twice; readers keep the last line of an op id.
    Observe(op, &*result, entry.sent);
    ledger_->Complete(op.op_id, *std::move(result), state ? &*state : nullptr);
    return;
  }
  Observe(op, nullptr, entry.sent);
}

std::optional<lathe::v1::JournalRun> Dispatcher::Record(const lathe::v1::SubmitRequest& op,
                                                        lathe::v1::OpResult* result) {
  const lathe::v1::ModelSummary model = registry_->model();
  absl::MutexLock lock(&mu_);
  auto it = runs_.find(op.run_id());
  if (it == runs_.end()) return std::nullopt;
  lathe::v1::RunInfo& info = it->second;
  if (result->has_init()) {
    // The replicas know their shard; the deployment-wide facts come from here.
    lathe::v1::RunInfo* init = result->mutable_init();
    init->set_base_model(model.base_model());
    init->set_max_seq_len(model.max_seq_len());
    *init->mutable_layout() = registry_->layout();
    init->set_policy_version(info.policy_version());
    init->set_created_unix_ms(info.created_unix_ms());
    info = *init;
    followed_from_[op.run_id()] = policy_paths_[op.run_id()].size();
  } else if (result->has_save_weights_for_sampler()) {
    policy_paths_[op.run_id()].push_back(result->save_weights_for_sampler().path());
    info.set_policy_version(info.policy_version() + 1);
    result->mutable_save_weights_for_sampler()->set_policy_version(info.policy_version());
  } else if (result->has_load_state()) {
    info.set_step(result->load_state().step());
  } else if (result->has_optim_step()) {
    info.set_step(info.step() + 1);
  } else if (result->has_delete_run()) {
    // The run is gone; its finished results stay retrievable in the ledger.
    runs_.erase(it);
    policy_paths_.erase(op.run_id());
    followed_from_.erase(op.run_id());
  } else {
    return std::nullopt;  // the run's entry is unchanged
  }
  return StateLocked(op.run_id());
}

}  // namespace lathe::coordinator
