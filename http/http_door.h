// The coordinator's HTTP door: Tinker's REST API (/api/v1/...) on the same
// FrontEnd as the gRPC Lathe service, so the Tinker SDK drives lathe
// unchanged. It only translates: validation, ordering, idempotency and
// results are the ledger's. Routes and their state: docs/http-api.md.
#ifndef LATHE_HTTP_HTTP_DOOR_H_
#define LATHE_HTTP_HTTP_DOOR_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "coordinator/front_end.h"
#include "coordinator/ops_view.h"

namespace lathe::http {

struct HttpOptions {
  std::string host = "127.0.0.1";
  int port = 0;  // 0: any free port (HttpDoor::port() tells which)
  // Requests handled at once. cpp-httplib serves each connection on one
  // pool thread, so a long-poll holds its thread while it waits; 1024 holds
  // 500 waiting polls with room for other calls (BENCHMARKS.md: 1041
  // threads, 29 MiB idle, 46 MiB with 500 polls).
  int threads = 1024;
  int64_t max_request_bytes = int64_t{64} << 20;  // larger bodies: 413
  // How long retrieve_future holds a poll before answering try_again
  // (the SDK's read timeout is 45 s).
  absl::Duration poll_hold = absl::Seconds(30);
  // A Tinker session not heard from (create_session, session_heartbeat) for
  // this long ends: its heartbeat is answered 410. Zero or less: never.
  absl::Duration session_timeout = absl::Minutes(10);
  // /metrics and the operator's page (/ops, docs/operations.md); null: not
  // served. Not owned; outlives the door.
  const coordinator::OpsView* ops = nullptr;
};

class HttpDoor {
 public:
  // Binds and starts serving on its own threads. Unavailable when the
  // address cannot be bound; InvalidArgument for bad options.
  // `front_end` is not owned and must outlive the door.
  static absl::StatusOr<std::unique_ptr<HttpDoor>> Start(const HttpOptions& options,
                                                          coordinator::FrontEnd* front_end);
  // Stops accepting and waits for the serving thread.
  ~HttpDoor();
  int port() const;
  void Stop();

 private:
  struct Impl;
  explicit HttpDoor(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lathe::http

#endif  // LATHE_HTTP_HTTP_DOOR_H_
