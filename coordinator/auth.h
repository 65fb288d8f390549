// API keys: a request carries "authorization: Bearer <key>" or
// "authorization: Api-Key <key>". Keys come from a file (one per line, '#'
// comments) and/or $LATHE_API_KEYS (comma-separated).
#ifndef LATHE_COORDINATOR_AUTH_H_
#define LATHE_COORDINATOR_AUTH_H_

#include <grpcpp/server_context.h>

#include <set>
#include <string>

#include "absl/status/statusor.h"

namespace lathe::coordinator {

enum class AuthMode { kAuto, kOn, kOff };

// "auto" | "on" | "off"; InvalidArgument otherwise.
absl::StatusOr<AuthMode> ParseAuthMode(const std::string& text);

// Whether a listen address (host:port) only accepts local connections.
bool IsLoopback(const std::string& listen_address);

class ApiKeys {
 public:
  // Resolves the mode (auto: off on loopback, on otherwise) and loads the
  // keys. NotFound for an unreadable key file; FailedPrecondition when keys
  // are required but none were given.
  static absl::StatusOr<ApiKeys> Load(AuthMode mode, const std::string& listen_address,
                                      const std::string& key_file);
  bool enabled() const { return enabled_; }
  // OK, or UNAUTHENTICATED naming what is wrong (never the expected key).
  grpc::Status Check(const grpc::ServerContext& context) const;

 private:
  bool enabled_ = false;
  std::set<std::string> keys_;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_AUTH_H_
