// The replica leader's connection to the coordinator: one Connect stream that
// registers the replica, delivers its tasks into a queue, carries heartbeats
// and returns results. Torch-free.
//
// Thread-safety: every public method may be called from any thread; a reader
// thread and a heartbeat thread run inside while connected.
#ifndef LATHE_DP_WORKER_REPLICA_LINK_H_
#define LATHE_DP_WORKER_REPLICA_LINK_H_

#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lathe/v1/replica.grpc.pb.h"

namespace lathe::dp_worker {

struct LinkOptions {
  std::string coordinator;   // host:port
  std::string worker_token;  // sent as "lathe-worker-token: <token>"
  // PEM root certificates; set: TLS, the coordinator's certificate verified
  // against them (and its name against the host of `coordinator`).
  std::string tls_root_certs;
  // Largest task accepted: the coordinator's default --max_request_bytes
  // (64 MiB) plus room for a task's envelope.
  int64_t max_message_bytes = int64_t{65} << 20;
  absl::Duration connect_timeout = absl::Minutes(5);
  // A coordinator silent this long (no heartbeat, no task) is gone: the link
  // closes and the replica stops.
  absl::Duration coordinator_timeout = absl::Minutes(5);
};

// The worker token: the first line of `path`, else $LATHE_WORKER_TOKEN.
// NotFound when `path` cannot be read; FailedPrecondition when neither gives
// a token.
absl::StatusOr<std::string> ReadWorkerToken(const std::string& path);
// The contents of a PEM file; NotFound when it cannot be read.
absl::StatusOr<std::string> ReadPemFile(const std::string& path);

class ReplicaLink {
 public:
  // Dials the coordinator (retrying until connect_timeout), opens the stream
  // and registers. Unavailable when the coordinator cannot be reached in
  // time; the coordinator's refusal (e.g. a duplicate replica) as it answered.
  static absl::StatusOr<std::unique_ptr<ReplicaLink>> Connect(const LinkOptions& options,
                                                              const lathe::v1::RegisterReplica& registration);
  ~ReplicaLink();

  // The next task, waiting up to `timeout`; nullopt when none arrived. After
  // the stream ended (coordinator gone or Shutdown received) `closed()` is
  // true and no more tasks come.
  std::optional<lathe::v1::Task> NextTask(absl::Duration timeout);
  bool closed() const;
  std::string close_reason() const;
  // Whether the coordinator ended the stream with a Shutdown (a clean stop).
  bool shut_down() const;

  // Sends a task's answer. Errors when the stream is gone are dropped (the
  // coordinator fails the task itself when it loses the replica).
  void SendResult(const lathe::v1::TaskResult& result);
  // Stops heartbeats, tells the coordinator the replica leaves, and closes
  // the stream.
  void Deregister(const std::string& reason);

 private:
  ReplicaLink() = default;
  void ReadLoop();
  void HeartbeatLoop();
  bool Write(const lathe::v1::WorkerMessage& message);

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<lathe::v1::ReplicaLink::Stub> stub_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<lathe::v1::WorkerMessage, lathe::v1::CoordinatorMessage>> stream_;
  absl::Duration heartbeat_interval_ = absl::Seconds(1);
  absl::Duration coordinator_timeout_ = absl::Minutes(5);

  mutable absl::Mutex mu_;
  std::deque<lathe::v1::Task> tasks_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::string close_reason_ ABSL_GUARDED_BY(mu_);
  absl::Time last_heard_ ABSL_GUARDED_BY(mu_);  // from the coordinator
  int64_t tasks_done_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Mutex write_mu_;  // one writer at a time on the stream
  bool writes_done_ ABSL_GUARDED_BY(write_mu_) = false;
  std::thread reader_;
  std::thread heartbeat_;
};

}  // namespace lathe::dp_worker

#endif  // LATHE_DP_WORKER_REPLICA_LINK_H_
