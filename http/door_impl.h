// The HTTP door's private parts, shared by its route files (http_door.cc:
// start-up and training routes; sampling_routes.cc: sampling;
// base_sampling.cc: base-model sampling sessions; state_routes.cc:
// load_weights and the management routes). Not for use outside http/.
#ifndef LATHE_HTTP_DOOR_IMPL_H_
#define LATHE_HTTP_DOOR_IMPL_H_

#include <httplib.h>

#include <functional>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "coordinator/front_end.h"
#include "http/door_sessions.h"
#include "http/http_door.h"
#include "http/sampling_sessions.h"

namespace lathe::http {

struct LoopsState;  // loops_door.h

inline constexpr char kJson[] = "application/json";
inline constexpr char kProto[] = "application/x-protobuf";
// Sampling sessions the door remembers; older ones are forgotten first.
inline constexpr size_t kMaxSamplingSessions = 4096;
// Live Tinker sessions the door remembers; past it the one silent longest ends.
inline constexpr size_t kMaxSessions = 65536;

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
// The SDKs number a client's later operations on past one the front end
// refused for its content (INVALID_ARGUMENT, UNIMPLEMENTED: nothing was
// queued), so those would wait for the refused seq_id until the gap timeout.
// For such a refusal of `op` (an ordered operation of a run), a noop takes
// its seq_id and the run's order goes on; true when one was queued. Other
// refusals (a key, the ledger's window, a seq_id taken) queue nothing.
bool FillRefusedSeq(coordinator::FrontEnd& front_end, const std::string& authorization,
                    const lathe::v1::SubmitRequest& op, const absl::Status& refusal,
                    lathe::v1::SubmitRequest* noop = nullptr);
// The run id of a client that (session_id, model_seq_id) names, as the SDK
// builds it: "<session_id>:train:<model_seq_id>"; nullopt when the body
// carries no session_id or model_seq_id. Throws json::exception (422 through
// PostJson) for fields of the wrong type.
std::optional<std::string> ModelIdOf(const nlohmann::json& body);

// The credential of a request to the operator's routes (/metrics, /ops/...):
// as Authorization, or for a GET of them without one, the login cookie.
std::string PageAuthorization(const httplib::Request& req);
// Routes open to every caller: the operator's login form (its body at most
// kMaxLoginBytes).
bool IsOpenPage(const httplib::Request& req);
inline constexpr int64_t kMaxLoginBytes = 4096;
// Answers an unauthenticated request: a browser opening /ops gets the login
// form (401), anything else the JSON error.
void RefusePage(const httplib::Request& req, const absl::Status& refusal, httplib::Response& res);

struct HttpDoor::Impl {
  HttpOptions options;
  coordinator::FrontEnd* front_end = nullptr;
  httplib::Server server;
  std::thread thread;
  int port = 0;
  // What a sampling_session_id names; made by create_sampling_session and by
  // the ephemeral save_weights_for_sampler (docs/http-api.md says how long
  // they live).
  SamplingSessions samplers{kMaxSamplingSessions};
  // The Tinker sessions this door made, while they live (made in Start).
  std::unique_ptr<DoorSessions> sessions;

  // Baseten Loops' routes (loops_routes.cc) and what they remember.
  std::shared_ptr<LoopsState> loops;
  void LoopsRoutes();
  // /metrics and the operator's page (ops_routes.cc); nothing without options.ops.
  void OpsRoutes();

  void Routes();
  // Removes the ephemeral sampler weights (save_weights_and_get_sampling_client)
  // of the runs of the Tinker sessions that ended since the last call.
  void RemoveEphemeralOfEndedSessions(const std::string& authorization);
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
  // create_sampling_session with base_model only (base_sampling.cc).
  void CreateBaseSamplingSession(const httplib::Request& req, const nlohmann::json& body, httplib::Response& res);
  void ASample(const httplib::Request& req, const nlohmann::json& body, httplib::Response& res);
  void Capabilities(const httplib::Request& req, httplib::Response& res);
  // Checkpoints and state (state_routes.cc): load_weights in both forms,
  // training runs, checkpoints, weights_info and sessions.
  void StateRoutes();
  void LoadWeights(const httplib::Request& req, const nlohmann::json& body, httplib::Response& res);
  void WeightsInfo(const httplib::Request& req, const nlohmann::json& body, httplib::Response& res);
  void TrainingRuns(const httplib::Request& req, httplib::Response& res);
  void Checkpoints(const httplib::Request& req, httplib::Response& res);
  void DeleteCheckpoint(const httplib::Request& req, httplib::Response& res);
  void Sessions(const httplib::Request& req, httplib::Response& res);
  absl::StatusOr<nlohmann::json> TrainingRunJson(const httplib::Request& req, const lathe::v1::RunInfo& info);
  // Answers the refusal of the ordered operation `op`, after FillRefusedSeq.
  void Refuse(const httplib::Request& req, const lathe::v1::SubmitRequest& op, const absl::Status& refusal,
              httplib::Response& res);
  // Submits `op` and answers Tinker's future {request_id, model_id}.
  void SubmitOp(const httplib::Request& req, const lathe::v1::SubmitRequest& op, httplib::Response& res);
};

}  // namespace lathe::http

#endif  // LATHE_HTTP_DOOR_IMPL_H_
