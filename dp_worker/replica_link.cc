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

absl::StatusOr<std::unique_ptr<ReplicaLink>> ReplicaLink::Connect(const LinkOptions& options,
                                                                  const lathe::v1::RegisterReplica& registration) {
  std::unique_ptr<ReplicaLink> link(new ReplicaLink());
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(std::min<int64_t>(options.max_message_bytes, INT32_MAX)));
  args.SetMaxSendMessageSize(-1);  // the coordinator enforces its own receive limit
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!options.tls_root_certs.empty()) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls_root_certs;
    credentials = grpc::SslCredentials(ssl);
  }
  link->channel_ = grpc::CreateCustomChannel(options.coordinator, credentials, args);
  const absl::Time deadline = absl::Now() + options.connect_timeout;
  while (!link->channel_->WaitForConnected(absl::ToChronoTime(std::min(deadline, absl::Now() + absl::Seconds(1))))) {
    if (absl::Now() >= deadline) {
      return absl::UnavailableError(absl::StrCat("coordinator ", options.coordinator, " not reachable within ",
                                                 absl::FormatDuration(options.connect_timeout)));
    }
  }
  link->stub_ = lathe::v1::ReplicaLink::NewStub(link->channel_);
  link->context_.AddMetadata("lathe-worker-token", options.worker_token);
  link->stream_ = link->stub_->Connect(&link->context_);
  lathe::v1::WorkerMessage hello;
  *hello.mutable_register_() = registration;
  lathe::v1::CoordinatorMessage answer;
  if (!link->stream_->Write(hello) || !link->stream_->Read(&answer) || !answer.has_registered()) {
    link->stream_->WritesDone();
    grpc::Status s = link->stream_->Finish();
    {
      // The stream is finished: the destructor must not deregister on it.
      absl::MutexLock lock(&link->mu_);
      link->stopping_ = true;
    }
    if (s.ok()) return absl::UnavailableError("coordinator closed the stream during registration");
    return FromGrpc(s);
  }
  if (answer.registered().heartbeat_interval_ms() > 0) {
    link->heartbeat_interval_ = absl::Milliseconds(answer.registered().heartbeat_interval_ms());
  }
  link->coordinator_timeout_ = options.coordinator_timeout;
  {
    absl::MutexLock lock(&link->mu_);
    link->last_heard_ = absl::Now();
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
  lathe::v1::CoordinatorMessage message;
  std::string reason = "coordinator closed the stream";
  bool shut_down = false;
  while (stream_->Read(&message)) {
    {
      absl::MutexLock lock(&mu_);
      last_heard_ = absl::Now();
    }
    if (message.has_shutdown()) {
      reason = absl::StrCat("coordinator shut down: ", message.shutdown().reason());
      shut_down = true;
      break;
    }
    if (message.has_task()) {
      absl::MutexLock lock(&mu_);
      tasks_.push_back(std::move(*message.mutable_task()));
    }
  }
  absl::MutexLock lock(&mu_);
  closed_ = true;
  shut_down_ = shut_down;
  if (close_reason_.empty()) close_reason_ = reason;
}

bool ReplicaLink::shut_down() const {
  absl::MutexLock lock(&mu_);
  return shut_down_;
}

void ReplicaLink::HeartbeatLoop() {
  auto stop_or_closed = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stopping_ || closed_; };
  absl::MutexLock lock(&mu_);
  while (!mu_.AwaitWithTimeout(absl::Condition(&stop_or_closed), heartbeat_interval_)) {
    if (const absl::Duration silent = absl::Now() - last_heard_; silent > coordinator_timeout_) {
      // The reader still waits on the stream: cancelling it ends the wait.
      close_reason_ = absl::StrCat("the coordinator sent nothing for ", absl::FormatDuration(silent),
                                   " (--coordinator_timeout_s)");
      context_.TryCancel();
      break;
    }
    lathe::v1::WorkerMessage beat;
    beat.mutable_heartbeat()->set_tasks_done(tasks_done_);
    mu_.Unlock();
    const bool ok = Write(beat);
    mu_.Lock();
    if (!ok) break;
  }
}

bool ReplicaLink::Write(const lathe::v1::WorkerMessage& message) {
  absl::MutexLock lock(&write_mu_);
  if (writes_done_) return false;
  return stream_->Write(message);
}

std::optional<lathe::v1::Task> ReplicaLink::NextTask(absl::Duration timeout) {
  auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return !tasks_.empty() || closed_; };
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
  if (tasks_.empty()) return std::nullopt;
  lathe::v1::Task task = std::move(tasks_.front());
  tasks_.pop_front();
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
    if (!writes_done_) {
      stream_->Write(bye);
      stream_->WritesDone();
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
  context_.TryCancel();
  if (reader_.joinable()) reader_.join();
  stream_->Finish();
}

}  // namespace lathe::dp_worker
