// The HTTP door's private parts, shared by its route files (http_door.cc:
// start-up and training routes; sampling_routes.cc: sampling). Not for use
// outside http/.
#ifndef LATHE_HTTP_DOOR_IMPL_H_
#define LATHE_HTTP_DOOR_IMPL_H_

#include <httplib.h>

#include <functional>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "coordinator/front_end.h"
#include "http/http_door.h"
#include "http/sampling_sessions.h"

namespace lathe::http {

struct LoopsState;  // loops_door.h

inline constexpr char kJson[] = "application/json";
inline constexpr char kProto[] = "application/x-protobuf";
// Sampling sessions the door remembers; older ones are forgotten first.
inline constexpr size_t kMaxSamplingSessions = 4096;

// Answers an error with the JSON body every error has:
// {"error": {"type", "code", "message"}, "detail"} (never empty: the SDK
// takes an empty 4xx for a proxy's and retries it).
void Fail(httplib::Response& res, int http_status, absl::string_view code, absl::string_view message);
// The same for a lathe status, with the HTTP status the SDK acts on
// correctly (docs/http-api.md, "Errors").
void Fail(httplib::Response& res, const absl::Status& s);
void Reply(httplib::Response& res, const nlohmann::json& body);
// The caller's credential as an authorization header value.
std::string Authorization(const httplib::Request& req);
// lathe://<run>/<kind>/<name> <-> tinker://<run>/<kind>/<name>; other
// text is returned unchanged.
std::string TinkerPath(absl::string_view lathe_path);
std::string LathePath(absl::string_view tinker_path);
// The run a lathe://<run>/<kind>/<name> path belongs to ("" if none).
std::string RunOfPath(absl::string_view lathe_path);
// "<prefix>-<16 hex>", random.
std::string NewId(const char* prefix);

struct HttpDoor::Impl {
  HttpOptions options;
  coordinator::FrontEnd* front_end = nullptr;
  httplib::Server server;
  std::thread thread;
  int port = 0;
  // create_model retried with the same (session_id, model_seq_id) gets the
  // run it created; CreateRun itself has no idempotency key. Only requests
  // that carry both are recognised, and the newest kCreatedKept are kept.
  static constexpr size_t kCreatedKept = 4096;
  absl::Mutex create_mu;
  std::map<std::pair<std::string, int64_t>, lathe::v1::CreateRunResponse> created ABSL_GUARDED_BY(create_mu);
  std::deque<std::pair<std::string, int64_t>> created_order ABSL_GUARDED_BY(create_mu);  // oldest first

  // What a sampling_session_id names; made by create_sampling_session and by
  // the ephemeral save_weights_for_sampler (docs/http-api.md says how long
  // they live).
  SamplingSessions samplers{kMaxSamplingSessions};

  // Baseten Loops' routes (loops_routes.cc) and what they remember.
  std::shared_ptr<LoopsState> loops;
  void LoopsRoutes();

  void Routes();
  // Wraps a JSON route: the body must be a JSON object; a body of the wrong
  // shape is answered 422 naming what is wrong.
  void PostJson(const char* path,
                std::function<void(const httplib::Request&, const nlohmann::json&, httplib::Response&)> f);
  void CreateModel(const httplib::Request& req, const nlohmann::json& body, httplib::Response& res);
  void GetInfo(const httplib::Request& req, const nlohmann::json& body, httplib::Response& res);
  void ForwardBackward(const httplib::Request& req, httplib::Response& res);
  void OptimStep(const httplib::Request& req, const nlohmann::json& body, httplib::Response& res);
  void SaveWeights(const httplib::Request& req, const nlohmann::json& body, httplib::Response& res);
  void SaveWeightsForSampler(const httplib::Request& req, const nlohmann::json& body, httplib::Response& res);
  void RetrieveFuture(const httplib::Request& req, const nlohmann::json& body, httplib::Response& res);
  void CreateSamplingSession(const httplib::Request& req, const nlohmann::json& body, httplib::Response& res);
  void GetSampler(const httplib::Request& req, httplib::Response& res);
  void ASample(const httplib::Request& req, const nlohmann::json& body, httplib::Response& res);
  void Capabilities(const httplib::Request& req, httplib::Response& res);
  // Submits `op` and answers Tinker's future {request_id, model_id}.
  void SubmitOp(const httplib::Request& req, const lathe::v1::SubmitRequest& op, httplib::Response& res);
};

}  // namespace lathe::http

#endif  // LATHE_HTTP_DOOR_IMPL_H_
