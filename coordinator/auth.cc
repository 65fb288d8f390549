// API-key checks on gRPC metadata.
#include "coordinator/auth.h"

#include <cstdlib>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace lathe::coordinator {

absl::StatusOr<AuthMode> ParseAuthMode(const std::string& text) {
  if (text == "auto") return AuthMode::kAuto;
  if (text == "on") return AuthMode::kOn;
  if (text == "off") return AuthMode::kOff;
  return absl::InvalidArgumentError(absl::StrCat("--auth must be auto, on or off, not '", text, "'"));
}

bool IsLoopback(const std::string& listen_address) {
  std::string host = listen_address;
  if (size_t colon = host.rfind(':'); colon != std::string::npos) host = host.substr(0, colon);
  if (absl::StartsWith(host, "ipv4:") || absl::StartsWith(host, "ipv6:")) host = host.substr(5);
  return host == "localhost" || host == "[::1]" || host == "::1" || absl::StartsWith(host, "127.");
}

absl::StatusOr<ApiKeys> ApiKeys::Load(AuthMode mode, const std::string& listen_address, const std::string& key_file) {
  ApiKeys keys;
  keys.enabled_ = mode == AuthMode::kOn || (mode == AuthMode::kAuto && !IsLoopback(listen_address));
  if (!key_file.empty()) {
    std::ifstream in(key_file);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read API key file ", key_file));
    for (std::string line; std::getline(in, line);) {
      absl::string_view key = absl::StripAsciiWhitespace(line);
      if (!key.empty() && key[0] != '#') keys.keys_.insert(std::string(key));
    }
  }
  if (const char* env = std::getenv("LATHE_API_KEYS"); env != nullptr) {
    for (absl::string_view key : absl::StrSplit(env, ',', absl::SkipWhitespace())) {
      keys.keys_.insert(std::string(absl::StripAsciiWhitespace(key)));
    }
  }
  if (keys.enabled_ && keys.keys_.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("API keys are required when listening on ", listen_address,
                     ": give --api_keys_file or $LATHE_API_KEYS, or --auth=off to serve without keys"));
  }
  return keys;
}

grpc::Status ApiKeys::Check(const grpc::ServerContext& context) const {
  if (!enabled_) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return {grpc::StatusCode::UNAUTHENTICATED, "missing authorization metadata"};
  absl::string_view value(it->second.data(), it->second.size());
  if (!absl::ConsumePrefix(&value, "Bearer ") && !absl::ConsumePrefix(&value, "Api-Key ")) {
    return {grpc::StatusCode::UNAUTHENTICATED, "authorization must be 'Bearer <key>' or 'Api-Key <key>'"};
  }
  if (keys_.count(std::string(absl::StripAsciiWhitespace(value))) == 0) {
    return {grpc::StatusCode::UNAUTHENTICATED, "unknown API key"};
  }
  return grpc::Status::OK;
}

}  // namespace lathe::coordinator
