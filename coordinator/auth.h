// Who may call the coordinator. Clients present an API key on lathe.v1.Lathe
// ("authorization: Bearer <key>" or "authorization: Api-Key <key>"; keys from
// a file, one per line with '#' comments, and/or $LATHE_API_KEYS,
// comma-separated). Replica leaders present the worker token on
// lathe.v1.ReplicaLink ("lathe-worker-token: <token>"). Neither credential
// opens the other service.
#ifndef LATHE_COORDINATOR_AUTH_H_
#define LATHE_COORDINATOR_AUTH_H_

#include <grpcpp/server_context.h>

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lathe::coordinator {

enum class AuthMode { kAuto, kOn, kOff };

// The metadata key that carries the worker token.
inline constexpr char kWorkerTokenHeader[] = "lathe-worker-token";
// Shortest worker token accepted (a guessable token is no credential).
inline constexpr size_t kMinWorkerTokenLength = 16;

// "auto" | "on" | "off"; InvalidArgument otherwise.
absl::StatusOr<AuthMode> ParseAuthMode(const std::string& text);

// Whether a listen address (host:port) only accepts local connections.
bool IsLoopback(const std::string& listen_address);

// Whether `presented` equals `expected`, taking time that depends only on
// the length of `presented` (so timing tells a caller nothing about how much
// of a secret it guessed).
bool ConstantTimeEquals(absl::string_view presented, absl::string_view expected);

class ApiKeys {
 public:
  // Resolves the mode (auto: off on loopback, on otherwise) and loads the
  // keys. NotFound for an unreadable key file; FailedPrecondition when keys
  // are required but none were given.
  static absl::StatusOr<ApiKeys> Load(AuthMode mode, const std::string& listen_address,
                                      const std::string& key_file);
  bool enabled() const { return enabled_; }
  // Whether `secret` is one of the keys (constant time per key).
  bool Contains(absl::string_view secret) const;
  // OK, or UNAUTHENTICATED naming what is wrong (never the expected key),
  // for the value of an authorization header: "Bearer <key>" or
  // "Api-Key <key>" (empty: none was sent). Thread-safe.
  absl::Status CheckAuthorization(absl::string_view authorization) const;

 private:
  bool enabled_ = false;
  std::vector<std::string> keys_;
};

// The one credential of the dp_worker replica leaders. Always required: a
// coordinator without one does not start.
class WorkerToken {
 public:
  // The first line of `path`, else $LATHE_WORKER_TOKEN. NotFound for an
  // unreadable file; FailedPrecondition when neither gives a token;
  // InvalidArgument for one shorter than kMinWorkerTokenLength.
  static absl::StatusOr<WorkerToken> Load(const std::string& path);
  const std::string& value() const { return token_; }
  // OK, or UNAUTHENTICATED when the call's metadata lacks the token or
  // carries another one. An API key in "authorization" is ignored.
  // Thread-safe.
  grpc::Status Check(const grpc::ServerContext& context) const;

 private:
  std::string token_;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_AUTH_H_
