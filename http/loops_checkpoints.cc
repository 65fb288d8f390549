// The Loops checkpoint routes (docs/http-api.md, "Control plane"): list,
// validate, page through files (per node_rank), download and delete lathe's
// checkpoints under Loops ids "<run>:<weights|sampler_weights>:<name>".
#include <algorithm>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "http/door_impl.h"
#include "http/loops_convert.h"
#include "http/loops_door.h"
#include "http/tinker_convert.h"
#include "core/quote.h"

namespace lathe::http {
namespace {

using nlohmann::json;

constexpr char kCheckpoint[] =
    R"(/v1/loops/checkpoints/([A-Za-z0-9._:-]{1,128}:(?:weights|sampler_weights):[A-Za-z0-9._-]{1,128}))";

std::string Iso8601(absl::Time t) { return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", t, absl::UTCTimeZone()); }

// "<run>:<kind>:<name>" (no slash: one path segment) <-> lathe://<run>/<kind>/<name>.
// A run id may hold ':' (Tinker's "<session>:train:<n>"); kinds and names
// never do, so they are the id's last two fields.
std::string CheckpointId(const std::string& lathe_path) {
  std::string id(absl::StripPrefix(lathe_path, "lathe://"));
  std::replace(id.begin(), id.end(), '/', ':');
  return id;
}

std::string PathOfId(std::string id) {
  const size_t name = id.rfind(':');
  const size_t kind = name == std::string::npos || name == 0 ? std::string::npos : id.rfind(':', name - 1);
  if (kind == std::string::npos) return "lathe://" + id;  // not an id the routes' pattern lets through
  id[name] = '/';
  id[kind] = '/';
  return "lathe://" + id;
}

json CheckpointJson(const LoopsDoor& door, const httplib::Request& req, const lathe::v1::Checkpoint& c,
                    const std::string& base_model) {
  const std::string run = RunOfPath(c.id());
  lathe::v1::GetInfoRequest info_request;
  info_request.set_run_id(run);
  lathe::v1::RunInfo info;  // rank 0 once the run is gone
  (void)door.front_end->GetInfo(Authorization(req), info_request, &info);
  return {{"id", CheckpointId(c.id())},
          {"run_id", run},
          {"checkpoint_id", c.id().substr(c.id().rfind('/') + 1)},
          {"checkpoint_path", BtPath(c.id())},
          {"checkpoint_type", "lora"},
          {"target", absl::StrContains(c.id(), "/sampler_weights/") ? "sampler" : "trainer"},
          {"created_at", Iso8601(absl::FromUnixMillis(c.created_unix_ms()))},
          {"base_model", base_model},
          {"lora_adapter_config", {{"r", info.lora().rank()}}},
          {"size_bytes", c.size_bytes()},
          {"sync_status", c.sync_state() == "committed" ? "COMPLETE" : "SYNCING"}};
}

// ?run_id=, ?checkpoint_path=bt://… or ?base_model= (every checkpoint: the
// deployment trains one model).
void List(const LoopsDoor& door, const httplib::Request& req, httplib::Response& res) {
  std::string run = req.get_param_value("run_id");
  std::string only;
  if (req.has_param("checkpoint_path")) {
    only = LatheFromBt(req.get_param_value("checkpoint_path"));
    if (only.empty()) {
      return Fail(res, 422, "INVALID_ARGUMENT", "checkpoint_path must be bt://loops:<run>/<kind>/<name>");
    }
    run = RunOfPath(only);
  }
  const std::string base = LoopsBaseModel(door, req);
  const bool all = run.empty() && req.has_param("base_model");
  if (all && req.get_param_value("base_model") != base) return Reply(res, {{"checkpoints", json::array()}});
  if (run.empty() && !all) return Fail(res, 422, "INVALID_ARGUMENT", "give run_id, checkpoint_path or base_model");
  lathe::v1::ListCheckpointsRequest request;
  request.set_run_id(run);
  lathe::v1::ListCheckpointsResponse list;
  if (absl::Status s = door.front_end->ListCheckpoints(Authorization(req), request, &list); !s.ok()) {
    return Fail(res, s);
  }
  json out = json::array();
  for (const lathe::v1::Checkpoint& c : list.checkpoints()) {
    if (only.empty() || c.id() == only) out.push_back(CheckpointJson(door, req, c, base));
  }
  Reply(res, {{"checkpoints", std::move(out)}});
}

// One page of files; page_token is the offset into the list, as Loops
// counts it (lathe's own token is that offset as text).
void Files(const LoopsDoor& door, const httplib::Request& req, httplib::Response& res) {
  const std::string id = req.matches[1];
  int64_t size = 1000, offset = 0;
  const std::string token = req.get_param_value("page_token");
  if ((req.has_param("page_size") && (!absl::SimpleAtoi(req.get_param_value("page_size"), &size) || size < 1)) ||
      (!token.empty() && (!absl::SimpleAtoi(token, &offset) || offset < 0))) {
    return Fail(res, 422, "INVALID_ARGUMENT", "page_size must be a positive integer and page_token a non-negative one");
  }
  lathe::v1::GetCheckpointFilesRequest request;
  request.set_checkpoint_id(PathOfId(id));
  request.set_page_size(static_cast<int32_t>(std::min<int64_t>(size, 1000)));
  if (offset > 0) request.set_page_token(std::to_string(offset));
  lathe::v1::GetCheckpointFilesResponse files;
  if (absl::Status s = door.front_end->GetCheckpointFiles(Authorization(req), request, &files); !s.ok()) {
    return Fail(res, s);
  }
  const std::string host = req.get_header_value("Host");
  const std::string origin = absl::StrCat("http://", host.empty() ? absl::StrCat("127.0.0.1:", *door.port) : host);
  json urls = json::array();
  for (const lathe::v1::CheckpointFile& f : files.files()) {
    urls.push_back({{"url", absl::StrCat(origin, "/v1/loops/checkpoints/", id, "/files/", f.relative_file_name())},
                    {"relative_file_name", f.relative_file_name()},
                    {"node_rank", f.node_rank()},
                    {"size_bytes", f.size_bytes()},
                    {"last_modified", Iso8601(absl::FromUnixMillis(f.last_modified_unix_ms()))}});
  }
  int64_t next = 0;
  Reply(res, {{"presigned_urls", std::move(urls)},
              {"next_page_token", absl::SimpleAtoi(files.next_page_token(), &next) ? json(next) : json(nullptr)},
              {"total_count", files.total_count()}});
}

void Download(const LoopsDoor& door, const httplib::Request& req, httplib::Response& res) {
  lathe::v1::DownloadCheckpointFileRequest request;
  request.set_checkpoint_id(PathOfId(req.matches[1].str()));
  request.set_relative_file_name(req.matches[2].str());
  const std::string auth = Authorization(req);
  // The key, the checkpoint and the file are checked before the status line
  // goes out (one chunk is read and dropped); then the file streams.
  absl::Status s = door.front_end->DownloadCheckpointFile(auth, request, [](const auto&) { return false; });
  if (!s.ok()) return Fail(res, s);
  coordinator::FrontEnd* fe = door.front_end;
  res.set_chunked_content_provider("application/octet-stream", [fe, auth, request](size_t, httplib::DataSink& sink) {
    absl::Status streamed = fe->DownloadCheckpointFile(auth, request, [&sink](const lathe::v1::FileChunk& c) {
      return sink.write(c.data().data(), c.data().size());
    });
    if (!streamed.ok()) return false;
    sink.done();
    return true;
  });
}

}  // namespace

void AddLoopsCheckpointRoutes(const LoopsDoor& door) {
  const std::string checkpoint = kCheckpoint;
  door.server->Get("/v1/loops/checkpoints", [door](auto& req, auto& res) { List(door, req, res); });
  door.server->Post("/v1/loops/checkpoints/validate", [door](const httplib::Request& req, httplib::Response& res) {
    json body;
    try {
      body = ParseJsonBody(req.body);  // nesting bounded: a deep body is refused below like any other
    } catch (const json::exception&) {
    }
    const json path = body.is_object() ? body.value("checkpoint_path", json()) : json();
    const std::string given = path.is_string() ? path.get<std::string>() : path.dump();
    lathe::v1::GetCheckpointFilesRequest probe;
    probe.set_checkpoint_id(LatheFromBt(given));
    probe.set_page_size(1);
    lathe::v1::GetCheckpointFilesResponse files;
    if (probe.checkpoint_id().empty() ||
        !door.front_end->GetCheckpointFiles(Authorization(req), probe, &files).ok()) {
      return Fail(res, 422, "NOT_FOUND", "no checkpoint " + runtime::QuoteForMessage(given));
    }
    Reply(res, {{"valid", true}});
  });
  door.server->Get(checkpoint + "/files", [door](auto& req, auto& res) { Files(door, req, res); });
  door.server->Get(checkpoint + "/files/(.+)", [door](auto& req, auto& res) { Download(door, req, res); });
  door.server->Delete(checkpoint, [door](const httplib::Request& req, httplib::Response& res) {
    lathe::v1::DeleteCheckpointRequest request;
    request.set_checkpoint_id(PathOfId(req.matches[1].str()));
    if (absl::Status s = door.front_end->DeleteCheckpoint(Authorization(req), request); !s.ok()) return Fail(res, s);
    Reply(res, {{"id", req.matches[1].str()}, {"deleted", true}});
  });
}

}  // namespace lathe::http
