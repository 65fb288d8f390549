// The leader's side of the ReplicaLink stream.
#include "dp_worker/replica_link.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/notification.h"
#include "core/log.h"

namespace lathe::dp_worker {
namespace {

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace

absl::StatusOr<std::string> ReadWorkerToken(const std::string& path) {
  std::string token;
  if (!path.empty()) {
    std::ifstream in(path);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read worker token file ", path));
    std::getline(in, token);
  } else if (const char* env = std::getenv("LATHE_WORKER_TOKEN"); env != nullptr) {
    token = env;
  }
  token = std::string(absl::StripAsciiWhitespace(token));
  if (token.empty()) {
    return absl::FailedPreconditionError(
        "no worker token: give --worker_token_file or $LATHE_WORKER_TOKEN (the coordinator's)");
  }
  return token;
}

absl::StatusOr<std::string> ReadPemFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

absl::StatusOr<std::unique_ptr<ReplicaLink::Connection>> ReplicaLink::Dial(
    const LinkOptions& options, const lathe::v1::RegisterReplica& registration, absl::Duration timeout) {
  auto c = std::make_unique<Connection>();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(std::min<int64_t>(options.max_message_bytes, INT32_MAX)));
  args.SetMaxSendMessageSize(-1);  // the coordinator enforces its own receive limit
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!options.tls_root_certs.empty()) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls_root_certs;
    credentials = grpc::SslCredentials(ssl);
  }
  c->channel = grpc::CreateCustomChannel(options.coordinator, credentials, args);
  const absl::Time deadline = absl::Now() + timeout;
  while (!c->channel->WaitForConnected(absl::ToChronoTime(std::min(deadline, absl::Now() + absl::Seconds(1))))) {
    if (absl::Now() >= deadline) {
      return absl::UnavailableError(absl::StrCat("coordinator ", options.coordinator, " not reachable within ",
                                                 absl::FormatDuration(timeout)));
    }
  }
  c->stub = lathe::v1::ReplicaLink::NewStub(c->channel);
  c->context = std::make_unique<grpc::ClientContext>();
  c->context->AddMetadata("lathe-worker-token", options.worker_token);
  c->stream = c->stub->Connect(c->context.get());
  lathe::v1::WorkerMessage hello;
  *hello.mutable_register_() = registration;
  lathe::v1::CoordinatorMessage answer;
  // A coordinator that accepts the connection but never answers (paused)
  // must not hold the leader: the answer is awaited until the deadline (at
  // least 10 s).
  absl::Notification answered;
  std::thread watchdog([&] {
    if (!answered.WaitForNotificationWithTimeout(std::max(deadline - absl::Now(), absl::Seconds(10)))) {
      c->context->TryCancel();
    }
  });
  const bool ok = c->stream->Write(hello) && c->stream->Read(&answer) && answer.has_registered();
  answered.Notify();
  watchdog.join();
  if (!ok) {
    c->stream->WritesDone();
    grpc::Status s = c->stream->Finish();
    if (s.ok()) return absl::UnavailableError("coordinator closed the stream during registration");
    return FromGrpc(s);
  }
  if (answer.registered().heartbeat_interval_ms() > 0) {
    c->heartbeat_interval = absl::Milliseconds(answer.registered().heartbeat_interval_ms());
  }
  return c;
}

absl::StatusOr<std::unique_ptr<ReplicaLink>> ReplicaLink::Connect(const LinkOptions& options,
                                                                  const lathe::v1::RegisterReplica& registration) {
  std::unique_ptr<ReplicaLink> link(new ReplicaLink());
  link->options_ = options;
  link->registration_ = registration;
  absl::StatusOr<std::unique_ptr<Connection>> conn = Dial(options, registration, options.connect_timeout);
  if (!conn.ok()) {
    absl::MutexLock lock(&link->mu_);
    link->stopping_ = true;  // nothing to deregister on
    return conn.status();
  }
  {
    absl::MutexLock lock(&link->mu_);
    link->last_heard_ = absl::Now();
    link->heartbeat_interval_ = (*conn)->heartbeat_interval;
    link->connected_ = true;
  }
  {
    absl::MutexLock lock(&link->write_mu_);
    link->conn_ = *std::move(conn);
  }
  link->reader_ = std::thread([l = link.get()] { l->ReadLoop(); });
  link->heartbeat_ = std::thread([l = link.get()] { l->HeartbeatLoop(); });
  return link;
}

ReplicaLink::~ReplicaLink() {
  Deregister("worker exiting");
  if (reader_.joinable()) reader_.join();
  if (heartbeat_.joinable()) heartbeat_.join();
}

void ReplicaLink::ReadLoop() {
  for (;;) {
    Connection* conn = nullptr;
    {
      absl::MutexLock lock(&write_mu_);
      conn = conn_.get();  // replaced only by this thread
    }
    lathe::v1::CoordinatorMessage message;
    std::string reason = "coordinator closed the stream";
    bool shut_down = false;
    while (conn->stream->Read(&message)) {
      absl::MutexLock lock(&mu_);
      last_heard_ = absl::Now();
      if (message.has_shutdown()) {
        reason = absl::StrCat("coordinator shut down: ", message.shutdown().reason());
        shut_down = true;
        break;
      }
      if (message.has_task()) {
        task_ops_[message.task().task_id()] = message.task().op_id();
        tasks_.push_back(std::move(*message.mutable_task()));
      }
    }
    {
      absl::MutexLock lock(&mu_);
      connected_ = false;
      if (shut_down || stopping_ || silent_ || options_.reconnect_timeout <= absl::ZeroDuration()) {
        closed_ = true;
        shut_down_ = shut_down;
        if (close_reason_.empty()) close_reason_ = reason;
        return;  // Deregister ends the stream
      }
    }
    {
      absl::MutexLock lock(&write_mu_);
      writes_done_ = true;  // nothing more is written on this stream
    }
    // The call is over (Read failed), so Finish answers at once, with why.
    const grpc::Status end = conn->stream->Finish();
    conn->finished = true;
    if (!end.ok()) reason = absl::StrCat(reason, " (", end.error_message(), ")");
    if (!Reconnect(reason)) return;
  }
}

bool ReplicaLink::Reconnect(const std::string& why) {
  const absl::Time deadline = absl::Now() + options_.reconnect_timeout;
  LATHE_LOG(Warning, "lost the coordinator (%s); finishing the tasks received, then redialing %s for up to %s", why,
            options_.coordinator, absl::FormatDuration(options_.reconnect_timeout));
  auto give_up = [&](const std::string& reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    closed_ = true;
    if (close_reason_.empty()) close_reason_ = reason;
    return false;
  };
  {
    // Every task received runs and is answered (and kept) first: the other
    // replicas may have started a task this one still holds, and a task
    // with a cross-replica collective must run on all of them. The report
    // is then whole.
    absl::MutexLock lock(&mu_);
    auto idle = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
      return stopping_ || (tasks_.empty() && tasks_taken_ == tasks_done_);
    };
    if (!mu_.AwaitWithDeadline(absl::Condition(&idle), deadline) || stopping_) {
      return give_up(absl::StrCat("the coordinator went away (", why, ") and the tasks received did not finish"));
    }
  }
  for (int attempt = 1;; ++attempt) {
    lathe::v1::RegisterReplica registration = registration_;
    registration.set_rejoin(true);
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return give_up("stopping");
      const absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) {
        return give_up(absl::StrCat("the coordinator did not come back within ",
                                    absl::FormatDuration(options_.reconnect_timeout),
                                    " (--reconnect_timeout_s) after: ", why));
      }
      for (const lathe::v1::KeptAnswer& k : kept_) *registration.add_kept() = k;
    }
    const absl::Duration left = deadline - absl::Now();
    absl::StatusOr<std::unique_ptr<Connection>> conn = Dial(options_, registration, std::min(left, absl::Seconds(5)));
    if (conn.ok()) {
      const absl::Duration interval = (*conn)->heartbeat_interval;
      {
        absl::MutexLock lock(&write_mu_);
        conn_ = *std::move(conn);
        writes_done_ = false;
      }
      absl::MutexLock lock(&mu_);
      heartbeat_interval_ = interval;
      last_heard_ = absl::Now();
      connected_ = true;
      LATHE_LOG(Info, "registered again with coordinator %s (attempt %d), reporting %d kept answer(s)",
                options_.coordinator, attempt, registration.kept_size());
      return true;
    }
    LATHE_LOG(Info, "redialing coordinator %s: attempt %d: %s; %s left", options_.coordinator, attempt,
              conn.status().ToString(), absl::FormatDuration(deadline - absl::Now()));
    absl::SleepFor(std::min(absl::Milliseconds(500), std::max(absl::ZeroDuration(), deadline - absl::Now())));
  }
}

bool ReplicaLink::shut_down() const {
  absl::MutexLock lock(&mu_);
  return shut_down_;
}

void ReplicaLink::HeartbeatLoop() {
  auto stop_or_closed = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stopping_ || closed_; };
  absl::MutexLock lock(&mu_);
  while (!mu_.AwaitWithTimeout(absl::Condition(&stop_or_closed), heartbeat_interval_)) {
    if (!connected_) continue;  // redialing
    if (const absl::Duration silent = absl::Now() - last_heard_; silent > options_.coordinator_timeout) {
      // The reader still waits on the stream: cancelling it ends the wait,
      // and the link ends (a silent coordinator is not redialed).
      close_reason_ = absl::StrCat("the coordinator sent nothing for ", absl::FormatDuration(silent),
                                   " (--coordinator_timeout_s)");
      silent_ = true;
      absl::MutexLock write_lock(&write_mu_);
      if (conn_ != nullptr) conn_->context->TryCancel();
      break;
    }
    lathe::v1::WorkerMessage beat;
    beat.mutable_heartbeat()->set_tasks_done(tasks_done_);
    mu_.Unlock();
    Write(beat);  // a failed write shows up as the stream's end in the reader
    mu_.Lock();
  }
}

bool ReplicaLink::Write(const lathe::v1::WorkerMessage& message) {
  absl::MutexLock lock(&write_mu_);
  if (writes_done_ || conn_ == nullptr) return false;
  return conn_->stream->Write(message);
}

std::optional<lathe::v1::Task> ReplicaLink::NextTask(absl::Duration timeout) {
  auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return !tasks_.empty() || closed_; };
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
  if (tasks_.empty()) return std::nullopt;
  lathe::v1::Task task = std::move(tasks_.front());
  tasks_.pop_front();
  ++tasks_taken_;
  return task;
}

bool ReplicaLink::closed() const {
  absl::MutexLock lock(&mu_);
  return closed_ && tasks_.empty();
}

std::string ReplicaLink::close_reason() const {
  absl::MutexLock lock(&mu_);
  return close_reason_;
}

void ReplicaLink::SendResult(const lathe::v1::TaskResult& result) {
  lathe::v1::WorkerMessage message;
  *message.mutable_result() = result;
  Write(message);
  absl::MutexLock lock(&mu_);
  ++tasks_done_;
  auto it = task_ops_.find(result.task_id());
  if (it == task_ops_.end()) return;
  if (!it->second.empty()) {
    lathe::v1::KeptAnswer& kept = kept_.emplace_back();
    kept.set_op_id(it->second);
    *kept.mutable_answer() = result;
    kept.mutable_answer()->set_task_id(0);
    if (kept_.size() > static_cast<size_t>(kKeptAnswers)) kept_.pop_front();
  }
  task_ops_.erase(it);
}

void ReplicaLink::Deregister(const std::string& reason) {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  if (heartbeat_.joinable()) heartbeat_.join();
  lathe::v1::WorkerMessage bye;
  bye.mutable_deregister()->set_reason(reason);
  {
    absl::MutexLock lock(&write_mu_);
    if (!writes_done_ && conn_ != nullptr) {
      conn_->stream->Write(bye);
      conn_->stream->WritesDone();
      writes_done_ = true;
    }
  }
  // The coordinator ends the stream once it read the deregistration; wait a
  // little for that (cancelling at once could overtake the message), but not
  // for a coordinator that is gone.
  {
    auto closed = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return closed_; };
    absl::MutexLock lock(&mu_);
    mu_.AwaitWithTimeout(absl::Condition(&closed), absl::Seconds(2));
  }
  {
    absl::MutexLock lock(&write_mu_);
    if (conn_ != nullptr) conn_->context->TryCancel();
  }
  if (reader_.joinable()) reader_.join();
  absl::MutexLock lock(&write_mu_);
  if (conn_ != nullptr && !conn_->finished) conn_->stream->Finish();
}

}  // namespace lathe::dp_worker
