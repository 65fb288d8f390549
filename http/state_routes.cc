// The HTTP door's checkpoint and state routes: load_weights (into a client,
// and as a new client from a checkpoint), and the management routes of the
// SDK's RestClient (training runs, checkpoints, weights_info, sessions).
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "http/door_impl.h"
#include "http/tinker_convert.h"
#include "core/checkpoint_path.h"
#include "core/quote.h"

namespace lathe::http {

using nlohmann::json;

namespace {

// Largest manifest weights_info reads.
constexpr int64_t kMaxManifestBytes = int64_t{64} << 20;
// A run id (or session id) in a route: what runtime::ValidateRunName allows;
// a checkpoint in one: its kind and name.
constexpr char kRun[] = "([A-Za-z0-9_-][A-Za-z0-9._:-]{0,127})";
constexpr char kCheckpoint[] = "(weights|sampler_weights)/([A-Za-z0-9_-][A-Za-z0-9._-]{0,127})";

// The SDK's datetimes: ISO 8601 in UTC.
std::string IsoTime(int64_t unix_ms) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::FromUnixMillis(unix_ms), absl::UTCTimeZone());
}

// A lathe checkpoint as Tinker's Checkpoint.
json CheckpointJson(const lathe::v1::Checkpoint& c) {
  absl::string_view id = c.id();
  absl::ConsumePrefix(&id, "lathe://");
  json out = {{"checkpoint_id", std::string(id.substr(id.find('/') + 1))},  // weights/<name>
              {"checkpoint_type", c.type()},
              {"time", IsoTime(c.created_unix_ms())},
              {"tinker_path", TinkerPath(c.id())},
              {"size_bytes", c.size_bytes()},
              {"public", false},
              {"expires_at", c.expires_unix_ms() > 0 ? json(IsoTime(c.expires_unix_ms())) : json(nullptr)}};
  return out;
}

// A query parameter as a non-negative integer (`fallback` when absent).
absl::StatusOr<int64_t> QueryCount(const httplib::Request& req, const char* name, int64_t fallback) {
  if (!req.has_param(name)) return fallback;
  int64_t value = 0;
  if (!absl::SimpleAtoi(req.get_param_value(name), &value) || value < 0) {
    return absl::InvalidArgumentError(absl::StrCat(name, " must be a non-negative integer, not ",
                                                   runtime::QuoteForMessage(req.get_param_value(name))));
  }
  return value;
}

// One page [offset, offset + limit) of `all` with Tinker's cursor.
json Page(const json& all, int64_t offset, int64_t limit, const char* key) {
  json page = json::array();
  for (int64_t i = offset; i < static_cast<int64_t>(all.size()) && i - offset < limit; ++i) page.push_back(all[i]);
  return {{key, std::move(page)},
          {"cursor", {{"offset", offset}, {"limit", limit}, {"total_count", all.size()}}}};
}

}  // namespace

std::optional<std::string> ModelIdOf(const json& body) {
  auto session = body.find("session_id");
  auto seq = body.find("model_seq_id");
  if (session == body.end() || session->is_null() || seq == body.end() || seq->is_null()) return std::nullopt;
  return absl::StrCat(session->get<std::string>(), ":train:", Number<int64_t>(*seq, "model_seq_id"));
}

void HttpDoor::Impl::StateRoutes() {
  using absl::StrCat;
  PostJson("/api/v1/load_weights", [this](auto& req, auto& body, auto& res) { LoadWeights(req, body, res); });
  PostJson("/api/v1/weights_info", [this](auto& req, auto& body, auto& res) { WeightsInfo(req, body, res); });
  auto runs = [this](auto& req, auto& res) { TrainingRuns(req, res); };
  auto checkpoints = [this](auto& req, auto& res) { Checkpoints(req, res); };
  auto sessions_route = [this](auto& req, auto& res) { Sessions(req, res); };
  server.Get("/api/v1/training_runs", runs);
  server.Get(StrCat("/api/v1/training_runs/", kRun), runs);
  server.Get(StrCat("/api/v1/training_runs/", kRun, "/checkpoints"), checkpoints);
  server.Get("/api/v1/checkpoints", checkpoints);
  server.Delete(StrCat("/api/v1/training_runs/", kRun, "/checkpoints/", kCheckpoint),
                [this](auto& req, auto& res) { DeleteCheckpoint(req, res); });
  server.Get("/api/v1/sessions", sessions_route);
  server.Get(StrCat("/api/v1/sessions/", kRun), sessions_route);
}

void HttpDoor::Impl::DeleteCheckpoint(const httplib::Request& req, httplib::Response& res) {
  lathe::v1::DeleteCheckpointRequest request;
  request.set_checkpoint_id(
      absl::StrCat("lathe://", req.matches[1].str(), "/", req.matches[2].str(), "/", req.matches[3].str()));
  if (absl::Status s = front_end->DeleteCheckpoint(Authorization(req), request); !s.ok()) return Fail(res, s);
  Reply(res, json::object());
}

void HttpDoor::Impl::LoadWeights(const httplib::Request& req, const json& body, httplib::Response& res) {
  const std::string tinker_path = body.at("path").get<std::string>();
  const std::string path = LathePath(tinker_path);
  absl::Status path_ok;
  if (!absl::StartsWith(tinker_path, "tinker://") || !runtime::ParseCheckpointPath(path).ok()) {
    path_ok = absl::InvalidArgumentError(
        absl::StrCat("path must be tinker://<run>/weights/<name>, not ", runtime::QuoteForMessage(tinker_path)));
  }
  const bool optimizer = body.value("optimizer", false);
  if (body.contains("model_id") && !body.at("model_id").is_null()) {
    // Into an existing client: one op of its run, in its seq_id order.
    lathe::v1::SubmitRequest op;
    op.set_run_id(body.at("model_id").get<std::string>());
    op.set_seq_id(Number<int64_t>(body.at("seq_id"), "seq_id"));
    (optimizer ? op.mutable_load_state_with_optimizer() : op.mutable_load_state())->set_path(path);
    if (!path_ok.ok()) return Refuse(req, op, path_ok, res);  // the SDK has taken this seq_id
    return SubmitOp(req, op, res);
  }
  if (!path_ok.ok()) return Fail(res, path_ok);
  // A new client: a run named as the SDK names it, started from the checkpoint.
  std::optional<std::string> run_id = ModelIdOf(body);
  if (!run_id.has_value()) {
    return Fail(res, 422, "INVALID_ARGUMENT",
                "load_weights needs model_id and seq_id (into a client) or session_id and model_seq_id (a new client)");
  }
  if (body.contains("optimizer_config") && !body.at("optimizer_config").is_null() &&
      body.at("optimizer_config").value("type", "adamw") != "adamw") {
    return Fail(res, 422, "INVALID_ARGUMENT", "only the adamw optimizer is supported");
  }
  lathe::v1::CreateRunRequest create;
  create.set_run_id(*run_id);
  if (body.contains("base_model") && !body.at("base_model").is_null()) {
    create.set_base_model(body.at("base_model").get<std::string>());
  }
  create.set_load_path(path);
  create.set_load_optimizer(optimizer);
  lathe::v1::CreateRunResponse response;
  if (absl::Status s = front_end->CreateRun(Authorization(req), create, &response); !s.ok()) return Fail(res, s);
  Reply(res, {{"request_id", response.init_op_id()}, {"model_id", response.run_id()}});
}

// Tinker's TrainingRun for a run: its newest checkpoint of each kind, and as
// last_request_time its creation or newest checkpoint, whichever is later.
absl::StatusOr<json> HttpDoor::Impl::TrainingRunJson(const httplib::Request& req, const lathe::v1::RunInfo& info) {
  json run = {{"training_run_id", info.run_id()},
              {"base_model", info.base_model()},
              {"model_owner", ""},
              {"is_lora", info.lora().rank() > 0},
              {"corrupted", false},
              {"lora_rank", info.lora().rank() > 0 ? json(info.lora().rank()) : json(nullptr)},
              {"last_checkpoint", nullptr},
              {"last_sampler_checkpoint", nullptr}};
  int64_t last = info.created_unix_ms();
  lathe::v1::ListCheckpointsRequest request;
  request.set_run_id(info.run_id());
  lathe::v1::ListCheckpointsResponse listed;
  absl::Status s = front_end->ListCheckpoints(Authorization(req), request, &listed);
  if (!s.ok() && s.code() != absl::StatusCode::kFailedPrecondition) return s;  // no checkpoint root: none
  for (const lathe::v1::Checkpoint& c : listed.checkpoints()) {  // newest first
    const char* key = c.type() == "training" ? "last_checkpoint" : "last_sampler_checkpoint";
    if (run[key].is_null()) run[key] = CheckpointJson(c);
    last = std::max(last, c.created_unix_ms());
  }
  run["last_request_time"] = IsoTime(last);
  return run;
}

void HttpDoor::Impl::TrainingRuns(const httplib::Request& req, httplib::Response& res) {
  if (req.matches.size() > 1) {  // one run
    lathe::v1::GetInfoRequest request;
    request.set_run_id(req.matches[1].str());
    lathe::v1::RunInfo info;
    if (absl::Status s = front_end->GetInfo(Authorization(req), request, &info); !s.ok()) return Fail(res, s);
    absl::StatusOr<json> run = TrainingRunJson(req, info);
    if (!run.ok()) return Fail(res, run.status());
    return Reply(res, *run);
  }
  absl::StatusOr<int64_t> limit = QueryCount(req, "limit", 20);
  absl::StatusOr<int64_t> offset = QueryCount(req, "offset", 0);
  if (!limit.ok() || !offset.ok()) return Fail(res, limit.ok() ? offset.status() : limit.status());
  std::vector<lathe::v1::RunInfo> runs;
  if (absl::Status s = front_end->ListRuns(Authorization(req), &runs); !s.ok()) return Fail(res, s);
  json all = json::array();
  for (int64_t i = *offset; i < static_cast<int64_t>(runs.size()) && i - *offset < *limit; ++i) {
    absl::StatusOr<json> run = TrainingRunJson(req, runs[i]);
    if (!run.ok()) return Fail(res, run.status());
    all.push_back(*std::move(run));
  }
  Reply(res, {{"training_runs", std::move(all)},
              {"cursor", {{"offset", *offset}, {"limit", *limit}, {"total_count", runs.size()}}}});
}

void HttpDoor::Impl::Checkpoints(const httplib::Request& req, httplib::Response& res) {
  lathe::v1::ListCheckpointsRequest request;
  const bool one_run = req.matches.size() > 1;
  if (one_run) request.set_run_id(req.matches[1].str());
  lathe::v1::ListCheckpointsResponse listed;
  if (absl::Status s = front_end->ListCheckpoints(Authorization(req), request, &listed); !s.ok()) return Fail(res, s);
  json all = json::array();
  for (const lathe::v1::Checkpoint& c : listed.checkpoints()) all.push_back(CheckpointJson(c));
  if (one_run) return Reply(res, {{"checkpoints", std::move(all)}});
  absl::StatusOr<int64_t> limit = QueryCount(req, "limit", 100);
  absl::StatusOr<int64_t> offset = QueryCount(req, "offset", 0);
  if (!limit.ok() || !offset.ok()) return Fail(res, limit.ok() ? offset.status() : limit.status());
  Reply(res, Page(all, *offset, *limit, "checkpoints"));
}

void HttpDoor::Impl::WeightsInfo(const httplib::Request& req, const json& body, httplib::Response& res) {
  const std::string tinker_path = body.at("tinker_path").get<std::string>();
  const std::string path = LathePath(tinker_path);
  if (!absl::StartsWith(tinker_path, "tinker://") || !runtime::ParseCheckpointPath(path).ok()) {
    return Fail(res, 422, "INVALID_ARGUMENT",
                absl::StrCat("tinker_path must be tinker://<run>/weights/<name>, not ",
                             runtime::QuoteForMessage(tinker_path)));
  }
  // The LoRA config is the checkpoint manifest's, read through the front end.
  lathe::v1::DownloadCheckpointFileRequest request;
  request.set_checkpoint_id(path);
  request.set_relative_file_name("manifest.json");
  std::string text;
  bool too_large = false;
  absl::Status s = front_end->DownloadCheckpointFile(Authorization(req), request, [&](const lathe::v1::FileChunk& c) {
    too_large = text.size() + c.data().size() > static_cast<size_t>(kMaxManifestBytes);
    if (!too_large) text += c.data();
    return !too_large;
  });
  if (!s.ok()) return Fail(res, s);
  const json manifest = json::parse(text, nullptr, /*allow_exceptions=*/false);
  const json* lora = manifest.is_object() && manifest.contains("lora") ? &manifest.at("lora") : nullptr;
  if (too_large || lora == nullptr || !lora->is_object() || !lora->value("rank", json()).is_number_integer()) {
    return Fail(res, 422, "DATA_LOSS", "the checkpoint's manifest has no LoRA config lathe can read");
  }
  lathe::v1::Capabilities caps;
  if (absl::Status c = front_end->GetCapabilities(Authorization(req), &caps); !c.ok()) return Fail(res, c);
  const int64_t rank = lora->at("rank").get<int64_t>();
  json reply = {{"base_model", caps.base_models_size() > 0 ? caps.base_models(0) : ""},
                {"optimizer_config", {{"type", "adamw"}}},
                {"is_lora", rank > 0}};
  if (rank > 0) reply["lora_rank"] = rank;
  for (const char* key : {"train_unembed", "train_mlp", "train_attn"}) {
    if (lora->contains(key) && lora->at(key).is_boolean()) reply[key] = lora->at(key);
  }
  Reply(res, reply);
}

// Sessions hold no state of their own: a session's training runs are the
// runs named "<session_id>:train:<n>" (create_model and load_weights name
// them so), and the sessions listed are those such runs name.
void HttpDoor::Impl::Sessions(const httplib::Request& req, httplib::Response& res) {
  std::vector<lathe::v1::RunInfo> runs;
  if (absl::Status s = front_end->ListRuns(Authorization(req), &runs); !s.ok()) return Fail(res, s);
  if (req.matches.size() > 1) {
    const std::string prefix = req.matches[1].str() + ":train:";
    json ids = json::array();
    for (const lathe::v1::RunInfo& run : runs) {
      if (absl::StartsWith(run.run_id(), prefix)) ids.push_back(run.run_id());
    }
    if (ids.empty()) {
      return Fail(res, 404, "NOT_FOUND",
                  absl::StrCat("no session ", runtime::QuoteForMessage(req.matches[1].str()), " with a training run"));
    }
    return Reply(res, {{"training_run_ids", std::move(ids)}, {"sampler_ids", json::array()}});
  }
  absl::StatusOr<int64_t> limit = QueryCount(req, "limit", 20);
  absl::StatusOr<int64_t> offset = QueryCount(req, "offset", 0);
  if (!limit.ok() || !offset.ok()) return Fail(res, limit.ok() ? offset.status() : limit.status());
  json sessions = json::array();
  for (const lathe::v1::RunInfo& run : runs) {
    const size_t at = run.run_id().rfind(":train:");
    if (at == std::string::npos || at == 0) continue;
    const std::string session = run.run_id().substr(0, at);
    if (std::find(sessions.begin(), sessions.end(), session) == sessions.end()) sessions.push_back(session);
  }
  json page = Page(sessions, *offset, *limit, "sessions");
  Reply(res, {{"sessions", std::move(page["sessions"])}});
}

}  // namespace lathe::http
