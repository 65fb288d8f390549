// The replica leader's connection to the coordinator: one Connect stream that
// registers the replica, delivers its tasks into a queue, carries heartbeats
// and returns results. When the stream breaks (the coordinator died or was
// restarted) the link keeps handing out the tasks it received until every
// one is answered, and then redials for up to reconnect_timeout, registering
// again with the answers of its last kKeptAnswers tasks, so a restarted
// coordinator learns which of its ops ran; the replica keeps its runs and
// serves on. Torch-free.
//
// Thread-safety: every public method may be called from any thread; a reader
// thread and a heartbeat thread run inside while connected.
#ifndef LATHE_DP_WORKER_REPLICA_LINK_H_
#define LATHE_DP_WORKER_REPLICA_LINK_H_

#include <deque>
#include <map>
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
  // How long a leader whose stream broke keeps redialing the coordinator to
  // register again; zero: it does not, and the replica stops.
  absl::Duration reconnect_timeout = absl::Minutes(5);
};

// Answers a leader keeps for a coordinator that restarts (the coordinator has
// at most 4 + its --max_inflight_samples tasks out at once).
inline constexpr int kKeptAnswers = 128;

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

  // The next task, waiting up to `timeout`; nullopt when none arrived (also
  // while redialing). After the link ended (Shutdown received, the
  // coordinator silent past coordinator_timeout, or not back within
  // reconnect_timeout) `closed()` is true and no more tasks come. Every task
  // taken must be answered with SendResult.
  std::optional<lathe::v1::Task> NextTask(absl::Duration timeout);
  bool closed() const;
  std::string close_reason() const;
  // Whether the coordinator ended the stream with a Shutdown (a clean stop).
  bool shut_down() const;

  // Sends a task's answer and keeps it (the last kKeptAnswers) for a
  // restarted coordinator. Errors when the stream is gone are dropped.
  void SendResult(const lathe::v1::TaskResult& result);
  // Stops heartbeats, tells the coordinator the replica leaves, and closes
  // the stream.
  void Deregister(const std::string& reason);

 private:
  // One registered stream (members in destruction order: the stream before
  // its context).
  struct Connection {
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<lathe::v1::ReplicaLink::Stub> stub;
    std::unique_ptr<grpc::ClientContext> context;
    std::unique_ptr<grpc::ClientReaderWriter<lathe::v1::WorkerMessage, lathe::v1::CoordinatorMessage>> stream;
    absl::Duration heartbeat_interval = absl::Seconds(1);
    bool finished = false;  // Finish was called
  };
  // Dials and registers within `timeout` (the coordinator's answer to the
  // registration included).
  static absl::StatusOr<std::unique_ptr<Connection>> Dial(const LinkOptions& options,
                                                          const lathe::v1::RegisterReplica& registration,
                                                          absl::Duration timeout);

  ReplicaLink() = default;
  // Reads the stream; when it breaks, redials (Reconnect) unless the link is
  // ending, and reads the new one.
  void ReadLoop();
  // True once registered again; false (closed_ set) when it gave up.
  bool Reconnect(const std::string& why);
  void HeartbeatLoop();
  bool Write(const lathe::v1::WorkerMessage& message);

  LinkOptions options_;
  lathe::v1::RegisterReplica registration_;
  std::unique_ptr<Connection> conn_ ABSL_GUARDED_BY(write_mu_);

  mutable absl::Mutex mu_;
  std::deque<lathe::v1::Task> tasks_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::string close_reason_ ABSL_GUARDED_BY(mu_);
  absl::Time last_heard_ ABSL_GUARDED_BY(mu_);  // from the coordinator
  absl::Duration heartbeat_interval_ ABSL_GUARDED_BY(mu_) = absl::Seconds(1);
  bool connected_ ABSL_GUARDED_BY(mu_) = false;  // registered on conn_
  bool silent_ ABSL_GUARDED_BY(mu_) = false;     // ended for coordinator_timeout
  int64_t tasks_done_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t tasks_taken_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<int64_t, std::string> task_ops_ ABSL_GUARDED_BY(mu_);  // op id of each task not yet answered
  std::deque<lathe::v1::KeptAnswer> kept_ ABSL_GUARDED_BY(mu_);
  absl::Mutex write_mu_;  // one writer at a time on the stream
  bool writes_done_ ABSL_GUARDED_BY(write_mu_) = false;
  std::thread reader_;
  std::thread heartbeat_;
};

}  // namespace lathe::dp_worker

#endif  // LATHE_DP_WORKER_REPLICA_LINK_H_
