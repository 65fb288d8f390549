// API-key and worker-token checks on gRPC metadata.
#include "coordinator/auth.h"

#include <cstdlib>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace lathe::coordinator {
namespace {

// Points *value at metadata `key` and returns true; false when it is absent.
bool FindMetadata(const grpc::ServerContext& context, const char* key, absl::string_view* value) {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find(key);
  if (it == metadata.end()) return false;
  *value = absl::string_view(it->second.data(), it->second.size());
  return true;
}

}  // namespace

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

bool ConstantTimeEquals(absl::string_view presented, absl::string_view expected) {
  // Every byte of `presented` is compared (against `expected` repeated), and
  // the result is only read at the end: no early exit.
  volatile unsigned char diff = presented.size() == expected.size() ? 0 : 1;
  if (expected.empty()) return false;
  for (size_t i = 0; i < presented.size(); ++i) {
    diff = diff | static_cast<unsigned char>(presented[i] ^ expected[i % expected.size()]);
  }
  return diff == 0;
}

absl::StatusOr<ApiKeys> ApiKeys::Load(AuthMode mode, const std::string& listen_address, const std::string& key_file) {
  ApiKeys keys;
  keys.enabled_ = mode == AuthMode::kOn || (mode == AuthMode::kAuto && !IsLoopback(listen_address));
  auto add = [&keys](absl::string_view key) {
    key = absl::StripAsciiWhitespace(key);
    if (!key.empty() && key[0] != '#') keys.keys_.emplace_back(key);
  };
  if (!key_file.empty()) {
    std::ifstream in(key_file);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read API key file ", key_file));
    for (std::string line; std::getline(in, line);) add(line);
  }
  if (const char* env = std::getenv("LATHE_API_KEYS"); env != nullptr) {
    for (absl::string_view key : absl::StrSplit(env, ',', absl::SkipWhitespace())) add(key);
  }
  if (keys.enabled_ && keys.keys_.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("API keys are required when listening on ", listen_address,
                     ": give --api_keys_file or $LATHE_API_KEYS, or --auth=off to serve without keys"));
  }
  return keys;
}

bool ApiKeys::Contains(absl::string_view secret) const {
  bool found = false;
  for (const std::string& key : keys_) found |= ConstantTimeEquals(secret, key);
  return found;
}

absl::Status ApiKeys::CheckAuthorization(absl::string_view value) const {
  if (!enabled_) return absl::OkStatus();
  if (value.empty()) return absl::UnauthenticatedError("missing API key (authorization)");
  if (!absl::ConsumePrefix(&value, "Bearer ") && !absl::ConsumePrefix(&value, "Api-Key ")) {
    return absl::UnauthenticatedError("authorization must be 'Bearer <key>' or 'Api-Key <key>'");
  }
  if (!Contains(absl::StripAsciiWhitespace(value))) return absl::UnauthenticatedError("unknown API key");
  return absl::OkStatus();
}

absl::StatusOr<WorkerToken> WorkerToken::Load(const std::string& path) {
  WorkerToken token;
  if (!path.empty()) {
    std::ifstream in(path);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read worker token file ", path));
    std::string line;
    std::getline(in, line);
    token.token_ = std::string(absl::StripAsciiWhitespace(line));
  } else if (const char* env = std::getenv("LATHE_WORKER_TOKEN"); env != nullptr) {
    token.token_ = std::string(absl::StripAsciiWhitespace(env));
  }
  if (token.token_.empty()) {
    return absl::FailedPreconditionError(
        "a worker token is required (replicas register with it): give --worker_token_file or "
        "$LATHE_WORKER_TOKEN, and the same to dp_worker; e.g. `openssl rand -hex 32`");
  }
  if (token.token_.size() < kMinWorkerTokenLength) {
    return absl::InvalidArgumentError(
        absl::StrCat("the worker token must have at least ", kMinWorkerTokenLength, " characters"));
  }
  return token;
}

grpc::Status WorkerToken::Check(const grpc::ServerContext& context) const {
  absl::string_view value;
  if (!FindMetadata(context, kWorkerTokenHeader, &value)) {
    return {grpc::StatusCode::UNAUTHENTICATED,
            absl::StrCat("ReplicaLink needs the worker token (", kWorkerTokenHeader, " metadata)")};
  }
  if (!ConstantTimeEquals(absl::StripAsciiWhitespace(value), token_)) {
    return {grpc::StatusCode::UNAUTHENTICATED, "wrong worker token"};
  }
  return grpc::Status::OK;
}

}  // namespace lathe::coordinator
