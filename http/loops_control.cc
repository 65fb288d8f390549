// The Loops control plane of a self-hosted deployment (docs/http-api.md,
// "Control plane"): capabilities, sessions, runs with their trainer and
// sampler URLs on this door, and the deployment statuses the SDK polls.
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "http/door_impl.h"
#include "http/loops_door.h"
#include "http/tinker_convert.h"
#include "core/quote.h"
#include "core/random_id.h"

namespace lathe::http {
namespace {

using nlohmann::json;

constexpr char kId[] = "([A-Za-z0-9._-]{1,128})";

std::string Iso8601(absl::Time t) { return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", t, absl::UTCTimeZone()); }

bool Given(const json& body, const char* key) { return body.contains(key) && !body.at(key).is_null(); }

// The scheme and host the caller reached the door on.
std::string Origin(const LoopsDoor& door, const httplib::Request& req) {
  const std::string host = req.get_header_value("Host");
  return absl::StrCat("http://", host.empty() ? absl::StrCat("127.0.0.1:", *door.port) : host);
}

json RunJson(const LoopsDoor& door, const httplib::Request& req, const LoopsState::Trainer& t) {
  const std::string base = absl::StrCat(Origin(door, req), "/loops/runs/", t.run);
  const std::string model = LoopsBaseModel(door, req);
  return {{"id", t.run},
          {"session_id", t.session_id},
          {"base_model", model},
          {"base_url", base},
          {"deployment_id", t.run},
          {"created_at", Iso8601(t.created_at)},
          {"sampler",
           {{"id", "sampler-" + t.run},
            {"base_url", base + "/sampler"},
            {"base_model", model},
            {"model_id", "lathe"},
            {"deployment_id", t.run},
            {"created_at", Iso8601(t.created_at)},
            {"status", {{"name", "ACTIVE"}}}}}};
}

// A run the control plane made.
std::optional<LoopsState::Trainer> FindRun(const LoopsDoor& door, const std::string& run) {
  absl::MutexLock lock(&door.st->mu);
  auto it = door.st->trainers.find(run);
  if (it == door.st->trainers.end() || run == kLoopsLocal) return std::nullopt;
  return it->second;
}

std::string Serving(const LoopsDoor& door) {
  lathe::v1::HealthResponse health;
  door.front_end->Health(&health);
  return health.state() == lathe::v1::HealthResponse::SERVING ? "ACTIVE" : "UNHEALTHY";
}

// What lathe cannot do as asked; "" if nothing.
std::string Refusal(const lathe::v1::Capabilities& caps, const json& body) {
  if (body.value("base_model", "").empty()) return "base_model is required";
  if (Given(body, "max_seq_len") && Number<int64_t>(body.at("max_seq_len"), "max_seq_len") > caps.max_seq_len()) {
    return absl::StrCat("max_seq_len ", body.at("max_seq_len").dump(), " is past this deployment's ",
                        caps.max_seq_len());
  }
  const int32_t replicas = caps.layout().replicas();
  if (Given(body, "replicas")) {
    const int64_t asked = Number<int64_t>(body.at("replicas"), "replicas");
    if (asked < 1 || asked > replicas) {
      return absl::StrCat("replicas must be 1..", replicas, ": every run trains on all of this deployment's ",
                          replicas, " replica(s)");
    }
  }
  for (const char* key : {"path", "base_checkpoint", "reuse_from_run_id", "reuse_from_session_id"}) {
    if (Given(body, key)) return absl::StrCat(key, " is not supported");
  }
  return "";
}

// POST runs / trainers: a lathe run whose trainer URL's first init is its creation.
void CreateRun(const LoopsDoor& door, const httplib::Request& req, const json& body, httplib::Response& res) {
  const std::string auth = Authorization(req);
  lathe::v1::Capabilities caps;
  if (absl::Status s = door.front_end->GetCapabilities(auth, &caps); !s.ok()) return Fail(res, s);
  if (std::string why = Refusal(caps, body); !why.empty()) return Fail(res, 422, "INVALID_ARGUMENT", why);
  lathe::v1::CreateRunRequest create;
  create.set_base_model(body.value("base_model", ""));
  create.mutable_lora()->set_rank(Given(body, "lora_rank") ? Number<int32_t>(body.at("lora_rank"), "lora_rank") : 64);
  if (Given(body, "seed")) create.mutable_lora()->set_seed(Number<int64_t>(body.at("seed"), "seed"));
  lathe::v1::CreateRunResponse created;
  if (absl::Status s = door.front_end->CreateRun(auth, create, &created); !s.ok()) return LoopsFail(door, res, s);
  LoopsState::Trainer t;
  t.run = created.run_id();
  t.offset = -1;
  t.fresh = true;
  t.lora_rank = create.lora().rank();
  t.created_op = created.init_op_id();
  t.session_id = body.value("session_id", "");
  t.created_at = absl::Now();
  {
    absl::MutexLock lock(&door.st->mu);
    door.st->trainers[t.run] = t;
  }
  Reply(res, {{"run", RunJson(door, req, t)}});
}

// POST samplers: a run's paired sampler (its sampler URL).
void CreateSampler(const LoopsDoor& door, const httplib::Request& req, const json& body, httplib::Response& res) {
  if (!Given(body, "run_id")) {
    return Fail(res, 422, "UNIMPLEMENTED",
                "only a run's paired sampler is served (send run_id); a standalone sampler of the base model "
                "is the paired sampler of a run that has published nothing");
  }
  const std::string run = body.at("run_id").get<std::string>();
  std::optional<LoopsState::Trainer> t = FindRun(door, run);
  if (!t.has_value()) return Fail(res, 422, "NOT_FOUND", "no Loops run " + runtime::QuoteForMessage(run));
  Reply(res, {{"sampler", RunJson(door, req, *t).at("sampler")}});
}

}  // namespace

void AddLoopsControlRoutes(const LoopsDoor& door) {
  const std::string id = kId;
  door.server->Get("/v1/loops/capabilities", [door](const httplib::Request& req, httplib::Response& res) {
    lathe::v1::Capabilities caps;
    if (absl::Status s = door.front_end->GetCapabilities(Authorization(req), &caps); !s.ok()) return Fail(res, s);
    json models = json::array();
    for (const std::string& name : caps.base_models()) {
      models.push_back({{"model_name", name}, {"max_context_length", caps.max_seq_len()}});
    }
    Reply(res, {{"supported_models", std::move(models)}});
  });
  // Sessions hold nothing; the SDK posts without a body.
  door.server->Post("/v1/loops/sessions", [](const httplib::Request&, httplib::Response& res) {
    Reply(res, {{"session", {{"id", runtime::RandomId("session")}}}});
  });
  door.server->Get("/v1/loops/sessions/" + id, [](const httplib::Request& req, httplib::Response& res) {
    Reply(res, {{"session", {{"id", req.matches[1].str()}}}});
  });
  door.post_json("/v1/loops/runs", [door](auto& req, auto& body, auto& res) { CreateRun(door, req, body, res); });
  door.post_json("/v1/loops/trainers", [door](auto& req, auto& body, auto& res) { CreateRun(door, req, body, res); });
  door.post_json("/v1/loops/samplers",
                 [door](auto& req, auto& body, auto& res) { CreateSampler(door, req, body, res); });
  door.server->Get("/v1/loops/runs/" + id, [door](const httplib::Request& req, httplib::Response& res) {
    const std::string run = req.matches[1];
    std::optional<LoopsState::Trainer> t = FindRun(door, run);
    if (!t.has_value()) return Fail(res, 404, "NOT_FOUND", "no Loops run " + runtime::QuoteForMessage(run));
    Reply(res, {{"run", RunJson(door, req, *t)}});
  });
  // A run's deployment is the run: ACTIVE while the deployment serves.
  door.server->Get("/v1/loops/deployments/" + id, [door](const httplib::Request& req, httplib::Response& res) {
    const std::string run = req.matches[1];
    std::optional<LoopsState::Trainer> t = FindRun(door, run);
    if (!t.has_value()) return Fail(res, 404, "NOT_FOUND", "no deployment " + runtime::QuoteForMessage(run));
    const json made = RunJson(door, req, *t);
    Reply(res, {{"deployment",
                 {{"id", t->run}, {"base_model", made.at("base_model")}, {"base_url", made.at("base_url")},
                  {"status", {{"name", Serving(door)}}}}}});
  });
  door.server->Get("/v1/models/" + id + "/deployments/" + id, [door](const httplib::Request& req,
                                                                      httplib::Response& res) {
    if (!FindRun(door, req.matches[2].str()).has_value()) {
      return Fail(res, 404, "NOT_FOUND", "no deployment " + runtime::QuoteForMessage(req.matches[2].str()));
    }
    Reply(res, {{"id", req.matches[2].str()}, {"status", Serving(door)}});
  });
}

}  // namespace lathe::http
