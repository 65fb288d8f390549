// The C++ client of a lathe deployment: submit an operation, get a future,
// wait on its result. A TrainingRun numbers its operations (seq_id 1, 2, …)
// so the deployment executes them in submission order; a submit that fails
// in transport is retried with the same seq_id, which the deployment
// recognises as the same operation.
//
// Thread-safety: Client is thread-safe; a TrainingRun is used by one thread
// at a time; futures are independent.
#ifndef LATHE_CLIENT_LATHE_CLIENT_H_
#define LATHE_CLIENT_LATHE_CLIENT_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lathe/v1/service.pb.h"

namespace lathe::client {

struct ClientOptions {
  std::string address = "127.0.0.1:7777";
  std::string api_key;                          // sent as "authorization: Bearer <key>"
  // PEM root certificates; set: TLS, the coordinator's certificate verified
  // against them (and its name against the host of `address`). Empty:
  // plaintext.
  std::string tls_root_certs;
  // Largest message sent or received (the coordinator's default
  // --max_request_bytes); a larger request fails with ResourceExhausted
  // before it is sent.
  int64_t max_message_bytes = int64_t{64} << 20;
  absl::Duration rpc_timeout = absl::Seconds(60);  // of each unary call
  int submit_attempts = 3;                      // tries per submit on a transport failure
  // How long submits and OpFuture::result keep retrying while the
  // coordinator is unreachable or starting (UNAVAILABLE: restarting, its
  // replicas registering again; not once Health says it is lost or shutting
  // down), on top of submit_attempts.
  absl::Duration reconnect_timeout = absl::Seconds(60);
};

class Client;

// An operation in flight. result() may be called repeatedly.
class OpFuture {
 public:
  OpFuture(Client* client, std::string op_id) : client_(client), op_id_(std::move(op_id)) {}
  const std::string& op_id() const { return op_id_; }
  // Waits up to `timeout` for the operation. DeadlineExceeded when it is
  // still pending; the operation's own error (its code, "user error: …" or
  // "server error: …") when it failed; the transport's error otherwise
  // (UNAVAILABLE only once it lasted past ClientOptions::reconnect_timeout
  // or the timeout).
  absl::StatusOr<lathe::v1::OpResult> result(absl::Duration timeout) const;

 private:
  Client* client_;
  std::string op_id_;
};

class TrainingRun {
 public:
  const std::string& run_id() const { return run_id_; }
  int64_t next_seq_id() const { return next_seq_; }

  // Each validates at submit: InvalidArgument (nothing queued) for bad input.
  absl::StatusOr<OpFuture> ForwardBackward(const lathe::v1::ForwardBackwardInput& input);
  absl::StatusOr<OpFuture> Forward(const lathe::v1::ForwardBackwardInput& input);
  absl::StatusOr<OpFuture> OptimStep(const lathe::v1::AdamParams& params);
  absl::StatusOr<OpFuture> Init(const lathe::v1::LoraConfig& lora);
  absl::StatusOr<OpFuture> Noop();
  // Any operation: run_id and seq_id are filled in.
  absl::StatusOr<OpFuture> Submit(lathe::v1::SubmitRequest op);

 private:
  friend class Client;
  TrainingRun(Client* client, std::string run_id) : client_(client), run_id_(std::move(run_id)) {}
  Client* client_;
  std::string run_id_;
  int64_t next_seq_ = 1;
};

class Client {
 public:
  // Creates the channel (connection happens on first use).
  static std::unique_ptr<Client> Connect(const ClientOptions& options);
  ~Client();

  absl::StatusOr<lathe::v1::HealthResponse> Health();
  // Polls Health until SERVING. DeadlineExceeded with the last detail after
  // `timeout`; Unavailable at once when the deployment lost a replica.
  absl::Status WaitServing(absl::Duration timeout);
  absl::StatusOr<lathe::v1::Capabilities> GetCapabilities();
  absl::StatusOr<lathe::v1::RunInfo> GetInfo(const std::string& run_id);
  absl::StatusOr<lathe::v1::ListCheckpointsResponse> ListCheckpoints(const std::string& run_id);

  // Creates a run and waits up to `timeout` for its initialisation.
  absl::StatusOr<std::pair<TrainingRun, lathe::v1::RunInfo>> CreateRun(const lathe::v1::LoraConfig& lora,
                                                                        absl::Duration timeout);
  // Submits as is (the caller numbers seq_id).
  absl::StatusOr<OpFuture> Submit(const lathe::v1::SubmitRequest& op);
  // One Retrieve call, waiting up to `wait` on the server.
  absl::StatusOr<lathe::v1::RetrieveResponse> Retrieve(const std::string& op_id, absl::Duration wait);
  const ClientOptions& options() const;
  // False when Health answers that the deployment is lost or shutting down;
  // true when it serves, starts, or cannot be reached (it may be restarting).
  bool MayComeBack();

 private:
  Client() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lathe::client

#endif  // LATHE_CLIENT_LATHE_CLIENT_H_
