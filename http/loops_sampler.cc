// The Loops sampler routes (docs/http-api.md, "Sampler routes"): /sample
// runs lathe's sample op pinned to the run's live version (or the base
// model) outside the run's order, and answers in OpenAI's completions shape.
#include <cctype>
#include <optional>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "http/door_impl.h"
#include "http/loops_convert.h"
#include "http/loops_door.h"
#include "core/random_id.h"

namespace lathe::http {
namespace {

using nlohmann::json;
using State = lathe::v1::RetrieveResponse;

// How long a gated /sample waits for a publication in flight before its 408.
constexpr absl::Duration kGateHold = absl::Seconds(10);

// The live version, once a bump_version save in flight had `kGateHold` to
// bring it up to `floor`.
std::optional<LoopsState::Version> GatedVersion(const LoopsDoor& door, const std::string& auth,
                                                const std::string& run, int64_t floor) {
  std::optional<LoopsState::Version> live = LiveVersion(door, auth, run);
  if (floor <= 0 || (live.has_value() && live->step >= floor)) return live;
  std::string newest;
  {
    absl::MutexLock lock(&door.st->mu);
    const std::vector<std::string>& published = door.st->books[run].published;
    if (!published.empty()) newest = published.back();
  }
  if (newest.empty()) return live;
  (void)AwaitOp(door, auth, newest, kGateHold);
  return LiveVersion(door, auth, run);
}

// Each request is a lane of its own, named by its Idempotency-Key: a retry
// is the same op.
std::string Lane(const httplib::Request& req) {
  std::string lane;
  for (char c : req.get_header_value("Idempotency-Key")) {
    if (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_') lane += c;
  }
  return lane.empty() ? runtime::RandomId("loops") : "loops-" + lane.substr(0, 50);
}

void Sample(const LoopsDoor& door, const httplib::Request& req, const json& body, httplib::Response& res) {
  const std::string auth = Authorization(req);
  const std::string run = LoopsRun(door, req);
  if (run.empty()) return Fail(res, 422, "FAILED_PRECONDITION", "no trainer yet: call init_trainer_server first");
  int64_t floor = 0;
  if (req.has_header("X-Min-Policy-Version") &&
      !absl::SimpleAtoi(req.get_header_value("X-Min-Policy-Version"), &floor)) {
    return Fail(res, 422, "INVALID_ARGUMENT", "X-Min-Policy-Version must be an integer");
  }
  // A pinned checkpoint is served until the live version reaches the floor.
  const std::string pinned = LatheFromBt(req.get_header_value("X-Checkpoint-Path"));
  if (req.has_header("X-Checkpoint-Path") && !absl::StrContains(pinned, "/sampler_weights/")) {
    return Fail(res, 422, "INVALID_ARGUMENT", "X-Checkpoint-Path must be bt://loops:<run>/sampler_weights/<name>");
  }
  lathe::v1::SubmitRequest op;
  op.set_run_id(run);
  op.set_seq_id(1);
  if (absl::Status s = LoopsSampleFromJson(body, op.mutable_sample()); !s.ok()) return Fail(res, s);
  std::optional<LoopsState::Version> live =
      pinned.empty() ? GatedVersion(door, auth, run, floor) : LiveVersion(door, auth, run);
  const int64_t version = live.has_value() ? live->step : 0;
  res.set_header("x-trainers-policy-version", std::to_string(version));
  if (!pinned.empty() && (floor <= 0 || version < floor)) live = LoopsState::Version{version, pinned};
  if (pinned.empty() && version < floor) {
    res.status = 408;  // the SDK retries with backoff
    const std::string why = absl::StrCat("policy version ", floor, " is not live yet (live: ", version, ")");
    return Reply(res, {{"error", {{"type", "Timeout"}, {"message", why}}}});
  }
  if (live.has_value()) {
    op.mutable_sample()->set_model_path(live->path);
  } else {
    op.mutable_sample()->set_base(true);
  }
  lathe::v1::SubmitResponse response;
  if (absl::Status s = door.front_end->SubmitSampling(auth, op, Lane(req), &response); !s.ok()) {
    return LoopsFail(door, res, s);
  }
  absl::StatusOr<State> view;
  do {
    view = AwaitOp(door, auth, response.op_id(), absl::Minutes(10));
  } while (view.ok() && view->state() == State::PENDING);
  if (!view.ok()) return LoopsFail(door, res, view.status());
  if (view->state() == State::FAILED) {
    const bool user = view->error().category() == lathe::v1::OpError::USER;
    return Fail(res, user ? 422 : 500, user ? "INVALID_ARGUMENT" : "INTERNAL", view->error().message());
  }
  Reply(res, LoopsCompletion(op.sample(), view->result().sample(),
                             live.has_value() ? "default" : LoopsBaseModel(door, req)));
}

void Models(const LoopsDoor& door, const httplib::Request& req, httplib::Response& res) {
  lathe::v1::Capabilities caps;
  if (absl::Status s = door.front_end->GetCapabilities(Authorization(req), &caps); !s.ok()) return Fail(res, s);
  const std::string base = caps.base_models_size() > 0 ? caps.base_models(0) : "";
  json data = json::array(
      {{{"id", base}, {"object", "model"}, {"parent", nullptr}, {"max_model_len", caps.max_seq_len()}}});
  const std::string run = LoopsRun(door, req);
  if (!run.empty() && LiveVersion(door, Authorization(req), run).has_value()) {
    data.push_back({{"id", "default"}, {"object", "model"}, {"parent", base}});
  }
  Reply(res, {{"object", "list"}, {"data", std::move(data)}});
}

}  // namespace

void AddLoopsSamplerRoutes(const LoopsDoor& door) {
  const std::string s = std::string(kLoopsTrainer) + "/sampler";
  door.post_json(s + "/sample", [door](auto& req, auto& body, auto& res) { Sample(door, req, body, res); });
  door.server->Get(s + "/v1/models", [door](auto& req, auto& res) { Models(door, req, res); });
  door.server->Get(s + "/trainers_policy_version", [door](const httplib::Request& req, httplib::Response& res) {
    const std::string run = LoopsRun(door, req);
    std::optional<LoopsState::Version> live;
    if (!run.empty()) live = LiveVersion(door, Authorization(req), run);
    Reply(res, {{"policy_version", live.has_value() ? live->step : 0}});
  });
}

}  // namespace lathe::http
