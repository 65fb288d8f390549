// Tinker REST routes on cpp-httplib: parse the body, call the FrontEnd,
// answer in the shape and with the status the SDK acts on correctly.
#include "http/http_door.h"

#include <sys/socket.h>

#include <atomic>
#include <exception>
#include <memory>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "coordinator/request_limits.h"
#include "http/door_impl.h"
#include "http/tinker_convert.h"
#include "http/zstd_body.h"
#include "core/log.h"
#include "core/quote.h"
#include "core/random_id.h"

namespace lathe::http {
namespace {

using nlohmann::json;

// HTTP statuses chosen by what the SDKs do with them: the Tinker SDK retries
// 408/409/429/5xx (for minutes) and gives up at once on other 4xx, so every
// permanent error is a non-retried 4xx, and 503 only means "not now".
int HttpStatus(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kInvalidArgument: return 422;
    case absl::StatusCode::kAlreadyExists: return 422;  // 409 would be retried
    case absl::StatusCode::kNotFound: return 404;
    case absl::StatusCode::kFailedPrecondition: return 412;
    case absl::StatusCode::kUnauthenticated: return 401;
    case absl::StatusCode::kPermissionDenied: return 403;
    case absl::StatusCode::kResourceExhausted: return 429;
    case absl::StatusCode::kUnimplemented: return 422;  // 501 would be retried (5xx)
    case absl::StatusCode::kUnavailable: return 503;
    case absl::StatusCode::kDeadlineExceeded: return 504;
    default: return 500;
  }
}

}  // namespace

// Every error body: {"error": {"type", "code", "message"}, "detail"}; never
// empty (the SDK takes an empty 4xx for a proxy's and retries it).
void Fail(httplib::Response& res, int http_status, absl::string_view code, absl::string_view message) {
  const std::string text = runtime::TruncateMessage(message, coordinator::kMaxStatusMessageBytes);
  const char* type = http_status == 401 ? "AuthenticationError" : http_status < 500 ? "BadRequestError" : "ServerError";
  json body = {{"error", {{"type", type}, {"code", code}, {"message", text}}}, {"detail", text}};
  res.status = http_status;
  // A message may quote client bytes that are not UTF-8: replace them, never throw.
  res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), kJson);
}

void Fail(httplib::Response& res, const absl::Status& s) {
  Fail(res, HttpStatus(s.code()), absl::StatusCodeToString(s.code()), s.message());
}

void Reply(httplib::Response& res, const json& body) {
  res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), kJson);
}

// The caller's credential as an authorization header value: Tinker's
// X-API-Key, else Authorization ("Bearer <key>" / "Api-Key <key>").
std::string Authorization(const httplib::Request& req) {
  if (req.has_header("X-API-Key")) return "Api-Key " + req.get_header_value("X-API-Key");
  return req.get_header_value("Authorization");
}

// lathe://<run>/<kind>/<name> as the SDK parses checkpoint paths:
// tinker://<run>/<kind>/<name>.
std::string TinkerPath(absl::string_view lathe_path) {
  if (absl::ConsumePrefix(&lathe_path, "lathe://")) return absl::StrCat("tinker://", lathe_path);
  return std::string(lathe_path);
}

// tinker://<run>/<kind>/<name> as lathe's lathe://<run>/<kind>/<name>.
std::string LathePath(absl::string_view tinker_path) {
  if (absl::ConsumePrefix(&tinker_path, "tinker://")) return absl::StrCat("lathe://", tinker_path);
  return std::string(tinker_path);
}

// The run a lathe://<run>/<kind>/<name> path belongs to ("" if none).
std::string RunOfPath(absl::string_view lathe_path) {
  if (!absl::ConsumePrefix(&lathe_path, "lathe://")) return "";
  return std::string(lathe_path.substr(0, lathe_path.find('/')));
}

void HttpDoor::Impl::PostJson(const char* path,
                              std::function<void(const httplib::Request&, const json&, httplib::Response&)> f) {
  server.Post(path, [f](const httplib::Request& req, httplib::Response& res) {
    json body;
    try {
      body = ParseJsonBody(req.body);
    } catch (const json::exception& e) {
      return Fail(res, 422, "INVALID_ARGUMENT", absl::StrCat("the body is not JSON: ", e.what()));
    }
    if (!body.is_object()) return Fail(res, 422, "INVALID_ARGUMENT", "the body must be a JSON object");
    try {
      f(req, body, res);
    } catch (const json::exception& e) {
      Fail(res, 422, "INVALID_ARGUMENT", absl::StrCat("the body does not have the route's shape: ", e.what()));
    }
  });
}

namespace {

// What the headers say about the body, checked before any of it is read:
// cpp-httplib would read a chunked body, or one without a length, with no
// size limit, and would read (and discard) a body over the limit before
// answering 413. Answers a body the door will not read and returns true
// (the connection is then closed).
bool RefuseBody(const httplib::Request& req, int64_t max_bytes, httplib::Response& res) {
  // Only forward_backward / forward bodies may be zstd (proto_compress_fwdbwd).
  const std::string encoding = req.get_header_value("Content-Encoding");
  const bool zstd_route = req.path == "/api/v1/forward_backward" || req.path == "/api/v1/forward";
  if (!encoding.empty() && !absl::EqualsIgnoreCase(encoding, "identity") && !(zstd_route && encoding == "zstd")) {
    Fail(res, 415, "INVALID_ARGUMENT",
         absl::StrCat("Content-Encoding ", runtime::QuoteForMessage(encoding),
                      " is not accepted here (only forward_backward and forward bodies may be zstd)"));
    return true;
  }
  if (req.has_header("Transfer-Encoding")) {
    Fail(res, 411, "INVALID_ARGUMENT",
         "send the body with a Content-Length (Transfer-Encoding bodies are not accepted)");
    return true;
  }
  if (!req.has_header("Content-Length")) {
    if (req.method != "POST" && req.method != "PUT" && req.method != "PATCH") return false;
    Fail(res, 411, "INVALID_ARGUMENT", "a request with a body needs a Content-Length");
    return true;
  }
  int64_t length = 0;
  const std::string value = req.get_header_value("Content-Length");
  if (value.empty() || value.find_first_not_of("0123456789") != std::string::npos) {
    Fail(res, 400, "INVALID_ARGUMENT",
         absl::StrCat("Content-Length ", runtime::QuoteForMessage(value), " is not a byte count"));
    return true;
  }
  if (!absl::SimpleAtoi(value, &length) || length > max_bytes) {  // too many digits for int64 fails to parse
    Fail(res, 413, "RESOURCE_EXHAUSTED",
         absl::StrCat("the body (", runtime::QuoteForMessage(value), " bytes) is larger than --max_request_bytes (", max_bytes, ")"));
    return true;
  }
  return false;
}

}  // namespace

void HttpDoor::Impl::Routes() {
  // Keys before bodies: the pre-routing handler runs once the headers are
  // read and before any body is, so a caller without a key makes the door
  // read nothing more.
  server.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (req.path == "/api/v1/healthz") return httplib::Server::HandlerResponse::Unhandled;
    if (IsOpenPage(req)) {
      if (!RefuseBody(req, kMaxLoginBytes, res)) return httplib::Server::HandlerResponse::Unhandled;
    } else if (absl::Status s = front_end->Authorize(PageAuthorization(req)); !s.ok()) {
      RefusePage(req, s, res);
    } else if (!RefuseBody(req, options.max_request_bytes, res)) {
      return httplib::Server::HandlerResponse::Unhandled;
    }
    res.set_header("Connection", "close");
    return httplib::Server::HandlerResponse::Handled;
  });
  // A handler that throws answers 500 with what it threw (never an empty body).
  server.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    Fail(res, 500, "INTERNAL", absl::StrCat("the door failed on this request: ", what));
  });
  // Statuses httplib sets itself (unknown route 404, 413, a bad request
  // line) get a JSON body too.
  server.set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& req,
                                                                  httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    if (res.status == 404) {
      Fail(res, 404, "NOT_FOUND",
           absl::StrCat("no route ", req.method, " ", runtime::QuoteForMessage(req.path),
                        " (docs/http-api.md lists the routes)"));
    } else if (res.status == 413) {
      Fail(res, 413, "RESOURCE_EXHAUSTED", "the body is larger than --max_request_bytes");
    } else if (res.status == 414) {
      Fail(res, 414, "INVALID_ARGUMENT", "the request's URI is longer than the door reads");
    } else if (res.status == 415) {
      Fail(res, 415, "INVALID_ARGUMENT",
           "the body's Content-Encoding is not one the door reads (send it uncompressed)");
    } else {
      Fail(res, res.status, "INVALID_ARGUMENT", absl::StrCat("the request is not well-formed HTTP (", res.status, ")"));
    }
    return httplib::Server::HandlerResponse::Handled;
  }));
  PostJson("/api/v1/client/config", [](auto&, auto&, httplib::Response& res) {
    Reply(res, {{"pjwt_auth_enabled", false}, {"proto_compress_fwdbwd", true}});
  });
  PostJson("/api/v1/client/dynamic_config", [](auto&, auto&, httplib::Response& res) {
    Reply(res, {{"refresh_interval_sec", 300}, {"sample_cancel_enabled", false}});
  });
  PostJson("/api/v1/create_session", [this](auto& req, auto&, httplib::Response& res) {
    const std::string id = runtime::RandomId("session");
    sessions->Add(id, absl::Now());
    Reply(res, {{"session_id", id}});
    RemoveEphemeralOfEndedSessions(Authorization(req));
  });
  // 410 ends the SDK's heartbeat loop: for a session silent past
  // --http_session_timeout, finished, or not made by this coordinator.
  PostJson("/api/v1/session_heartbeat", [this](auto& req, const json& body, httplib::Response& res) {
    const std::string id = body.at("session_id").template get<std::string>();
    if (!sessions->Touch(id, absl::Now())) {
      Fail(res, 410, "NOT_FOUND",
           absl::StrCat("session ", runtime::QuoteForMessage(id),
                        " has ended (silent past --http_session_timeout, finished, or unknown)"));
    } else {
      Reply(res, {{"type", "session_heartbeat"}});
    }
    RemoveEphemeralOfEndedSessions(Authorization(req));
  });
  // The SDK's close() and the end of a `with ServiceClient()` block; the
  // session's runs and checkpoints stay.
  server.Post(R"(/api/v1/sessions/([A-Za-z0-9._-]{1,128})/finish)", [this](const httplib::Request& req,
                                                                           httplib::Response& res) {
    sessions->End(req.matches[1].str());
    Reply(res, json::object());
    RemoveEphemeralOfEndedSessions(Authorization(req));
  });
  PostJson("/api/v1/telemetry", [](auto&, auto&, httplib::Response& res) { Reply(res, {{"status", "accepted"}}); });
  server.Get("/api/v1/healthz", [this](const httplib::Request&, httplib::Response& res) {
    lathe::v1::HealthResponse health;
    front_end->Health(&health);
    const bool serving = health.state() == lathe::v1::HealthResponse::SERVING;
    res.status = serving ? 200 : 503;
    Reply(res, {{"status", serving ? "ok" : "unavailable"}, {"detail", health.detail()}});
  });
  server.Get("/api/v1/get_server_capabilities",
             [this](const httplib::Request& req, httplib::Response& res) { Capabilities(req, res); });
  PostJson("/api/v1/create_model", [this](auto& req, auto& body, auto& res) { CreateModel(req, body, res); });
  PostJson("/api/v1/get_info", [this](auto& req, auto& body, auto& res) { GetInfo(req, body, res); });
  server.Post("/api/v1/forward_backward", [this](auto& req, auto& res) { ForwardBackward(req, res); });
  server.Post("/api/v1/forward", [this](auto& req, auto& res) { ForwardBackward(req, res); });
  PostJson("/api/v1/optim_step", [this](auto& req, auto& body, auto& res) { OptimStep(req, body, res); });
  PostJson("/api/v1/save_weights", [this](auto& req, auto& body, auto& res) { SaveWeights(req, body, res); });
  PostJson("/api/v1/save_weights_for_sampler",
           [this](auto& req, auto& body, auto& res) { SaveWeightsForSampler(req, body, res); });
  PostJson("/api/v1/retrieve_future", [this](auto& req, auto& body, auto& res) { RetrieveFuture(req, body, res); });
  PostJson("/api/v1/create_sampling_session",
           [this](auto& req, auto& body, auto& res) { CreateSamplingSession(req, body, res); });
  server.Get(R"(/api/v1/samplers/[A-Za-z0-9_-]{1,64})", [this](auto& req, auto& res) { GetSampler(req, res); });
  PostJson("/api/v1/asample", [this](auto& req, auto& body, auto& res) { ASample(req, body, res); });
  LoopsRoutes();
  StateRoutes();
  OpsRoutes();
}

void HttpDoor::Impl::RemoveEphemeralOfEndedSessions(const std::string& authorization) {
  const std::vector<std::string> ended = sessions->TakeEnded(absl::Now());
  if (ended.empty()) return;
  lathe::v1::ListCheckpointsResponse listed;
  if (absl::Status s = front_end->ListCheckpoints(authorization, {}, &listed); !s.ok()) {
    LATHE_LOG(Warning, "ephemeral sampler weights of %d ended session(s) kept: %s", ended.size(), s.message());
    return;
  }
  for (const std::string& session : ended) {
    const std::string runs = absl::StrCat("lathe://", session, ":train:");
    for (const lathe::v1::Checkpoint& checkpoint : listed.checkpoints()) {
      const std::string& id = checkpoint.id();
      if (!absl::StartsWith(id, runs) || !absl::StrContains(id, "/sampler_weights/ephemeral-")) continue;
      lathe::v1::DeleteCheckpointRequest request;
      request.set_checkpoint_id(id);
      if (absl::Status s = front_end->DeleteCheckpoint(authorization, request); !s.ok()) {
        LATHE_LOG(Warning, "ephemeral sampler weights %s of ended session %s kept: %s", id, session, s.message());
      }
    }
  }
}

void HttpDoor::Impl::Capabilities(const httplib::Request& req, httplib::Response& res) {
  lathe::v1::Capabilities caps;
  if (absl::Status s = front_end->GetCapabilities(Authorization(req), &caps); !s.ok()) return Fail(res, s);
  json models = json::array();
  for (const std::string& name : caps.base_models()) {
    models.push_back({{"model_name", name}, {"max_context_length", caps.max_seq_len()}, {"trainable", true},
                      {"sampleable", true}});
  }
  Reply(res, {{"supported_models", std::move(models)}});
}

void HttpDoor::Impl::CreateModel(const httplib::Request& req, const json& body, httplib::Response& res) {
  if (body.contains("optimizer_config") && body.at("optimizer_config").value("type", "adamw") != "adamw") {
    return Fail(res, 422, "INVALID_ARGUMENT", "only the adamw optimizer is supported");
  }
  if (!body.contains("lora_config") || body.at("lora_config").is_null()) {
    return Fail(res, 422, "INVALID_ARGUMENT",
                "create_model needs lora_config (full fine-tuning is not served over HTTP yet)");
  }
  lathe::v1::CreateRunRequest create;
  create.set_base_model(body.value("base_model", ""));
  *create.mutable_lora() = LoraFromJson(body.at("lora_config"));
  if (create.lora().rank() < 1) return Fail(res, 422, "INVALID_ARGUMENT", "lora_config.rank must be at least 1");
  // Runs are named as the SDK names a model it creates from a checkpoint,
  // so a retry (the same body) answers the same run (CreateRun's rule).
  if (std::optional<std::string> id = ModelIdOf(body); id.has_value()) create.set_run_id(*id);
  lathe::v1::CreateRunResponse response;
  if (absl::Status s = front_end->CreateRun(Authorization(req), create, &response); !s.ok()) return Fail(res, s);
  Reply(res, {{"request_id", response.init_op_id()}, {"model_id", response.run_id()}});
}

void HttpDoor::Impl::GetInfo(const httplib::Request& req, const json& body, httplib::Response& res) {
  lathe::v1::GetInfoRequest request;
  request.set_run_id(String(body, "model_id"));
  lathe::v1::RunInfo info;
  if (absl::Status s = front_end->GetInfo(Authorization(req), request, &info); !s.ok()) return Fail(res, s);
  json reply = {{"model_id", info.run_id()},
                {"model_data",
                 {{"arch", info.architecture()},
                  {"model_name", info.base_model()},
                  {"tokenizer_id", info.base_model()}}},
                {"optimizer_config", {{"type", "adamw"}}},
                {"is_lora", info.lora().rank() > 0},
                {"model_name", info.base_model()},
                {"type", "get_info"}};
  if (info.lora().rank() > 0) reply["lora_rank"] = info.lora().rank();
  Reply(res, reply);
}

bool FillRefusedSeq(coordinator::FrontEnd& front_end, const std::string& authorization,
                    const lathe::v1::SubmitRequest& op, const absl::Status& refusal, lathe::v1::SubmitRequest* noop) {
  if (refusal.code() != absl::StatusCode::kInvalidArgument && refusal.code() != absl::StatusCode::kUnimplemented) {
    return false;
  }
  if (op.run_id().empty() || op.seq_id() < 1) return false;
  lathe::v1::SubmitRequest fill;
  fill.set_run_id(op.run_id());
  fill.set_seq_id(op.seq_id());
  fill.mutable_noop();
  lathe::v1::SubmitResponse filled;
  if (!front_end.Submit(authorization, fill, &filled).ok()) return false;
  if (noop != nullptr) *noop = std::move(fill);
  return true;
}

void HttpDoor::Impl::Refuse(const httplib::Request& req, const lathe::v1::SubmitRequest& op,
                            const absl::Status& refusal, httplib::Response& res) {
  FillRefusedSeq(*front_end, Authorization(req), op, refusal);
  Fail(res, refusal);
}

void HttpDoor::Impl::SubmitOp(const httplib::Request& req, const lathe::v1::SubmitRequest& op,
                              httplib::Response& res) {
  lathe::v1::SubmitResponse response;
  if (absl::Status s = front_end->Submit(Authorization(req), op, &response); !s.ok()) return Refuse(req, op, s, res);
  Reply(res, {{"request_id", response.op_id()}, {"model_id", op.run_id()}});
}

void HttpDoor::Impl::ForwardBackward(const httplib::Request& req, httplib::Response& res) {
  lathe::v1::SubmitRequest op;
  absl::Status s;
  // proto_compress_fwdbwd: the SDK zstd-compresses the body.
  absl::StatusOr<std::string> decompressed;
  const std::string encoding = req.get_header_value("Content-Encoding");
  if (encoding == "zstd") {
    decompressed = DecompressZstd(req.body, options.max_request_bytes);
    if (decompressed.status().code() == absl::StatusCode::kResourceExhausted) {
      return Fail(res, 413, "RESOURCE_EXHAUSTED", decompressed.status().message());
    }
    if (!decompressed.ok()) return Fail(res, decompressed.status());
  } else if (!encoding.empty() && encoding != "identity") {
    return Fail(res, 415, "INVALID_ARGUMENT",
                absl::StrCat("Content-Encoding ", runtime::QuoteForMessage(encoding), " is not supported (zstd is)"));
  }
  const std::string& body = decompressed.ok() ? *decompressed : req.body;
  if (absl::StrContains(req.get_header_value("Content-Type"), kProto)) {
    tinker::ForwardBackwardRequest request;
    if (!request.ParseFromString(body)) {
      return Fail(res, 422, "INVALID_ARGUMENT", "the body does not parse as a ForwardBackwardRequest");
    }
    s = ForwardBackwardFromProto(request, &op);
  } else {
    try {
      s = ForwardBackwardFromJson(ParseJsonBody(body), req.path == "/api/v1/forward", &op);
    } catch (const json::exception& e) {
      return Fail(res, 422, "INVALID_ARGUMENT", absl::StrCat("the body is not a forward_backward request: ", e.what()));
    }
  }
  if (!s.ok()) {
    // A request the SDK made (images, sparse tensors, ...) names its run and
    // seq_id; one that does not parse queues nothing.
    return Refuse(req, op, s, res);
  }
  SubmitOp(req, op, res);
}

void HttpDoor::Impl::OptimStep(const httplib::Request& req, const json& body, httplib::Response& res) {
  lathe::v1::SubmitRequest op;
  op.set_run_id(String(body, "model_id"));
  op.set_seq_id(Number<int64_t>(body.at("seq_id"), "seq_id"));
  const bool adam = body.contains("adam_params") && !body.at("adam_params").is_null();
  try {
    *op.mutable_optim_step() = AdamFromJson(adam ? body.at("adam_params") : json::object());
  } catch (const json::exception& e) {
    // A bad value (the SDK's NaN arrives as null) in a request that names its
    // run and seq_id: refused for its content, so its seq_id gets the noop.
    return Refuse(req, op, absl::InvalidArgumentError(absl::StrCat("adam_params: ", e.what())), res);
  }
  SubmitOp(req, op, res);
}

void HttpDoor::Impl::SaveWeights(const httplib::Request& req, const json& body, httplib::Response& res) {
  lathe::v1::SubmitRequest op;
  op.set_run_id(String(body, "model_id"));
  op.set_seq_id(Number<int64_t>(body.at("seq_id"), "seq_id"));
  lathe::v1::SaveStateOp* save = op.mutable_save_state();
  save->set_name(String(body, "path"));
  if (body.contains("ttl_seconds") && !body.at("ttl_seconds").is_null()) {
    save->set_ttl_seconds(Number<int64_t>(body.at("ttl_seconds"), "ttl_seconds"));
  }
  save->set_overwrite(body.value("overwrite", false));
  SubmitOp(req, op, res);
}

void HttpDoor::Impl::RetrieveFuture(const httplib::Request& req, const json& body, httplib::Response& res) {
  lathe::v1::RetrieveRequest request;
  request.set_op_id(String(body, "request_id"));
  request.set_wait_ms(absl::ToInt64Milliseconds(options.poll_hold));
  lathe::v1::RetrieveResponse view;
  if (absl::Status s = front_end->Retrieve(Authorization(req), request, absl::InfiniteFuture(), &view); !s.ok()) {
    return Fail(res, s);
  }
  using State = lathe::v1::RetrieveResponse;
  if (view.state() == State::PENDING) {
    return Reply(res, {{"type", "try_again"}, {"request_id", view.op_id()}, {"queue_state", "active"}});
  }
  if (view.state() == State::FAILED) {
    const bool user = view.error().category() == lathe::v1::OpError::USER;
    return Reply(res, {{"error", runtime::TruncateMessage(view.error().message(), coordinator::kMaxStatusMessageBytes)},
                       {"category", user ? "user" : "server"}});
  }
  const lathe::v1::OpResult& result = view.result();
  switch (result.result_case()) {
    case lathe::v1::OpResult::kInit:
      if (!result.init().loaded_from().empty()) {  // load_weights that made a client
        return Reply(res, {{"path", TinkerPath(result.init().loaded_from())},
                           {"model_id", result.init().run_id()},
                           {"type", "load_weights"}});
      }
      return Reply(res, {{"model_id", result.init().run_id()}, {"type", "create_model"}});
    case lathe::v1::OpResult::kLoadState:
      return Reply(res, {{"path", TinkerPath(result.load_state().path())}, {"type", "load_weights"}});
    case lathe::v1::OpResult::kForwardBackward:
      if (absl::StrContains(req.get_header_value("Accept"), kProto)) {
        return res.set_content(ForwardBackwardOutputToProto(result.forward_backward()), kProto);
      }
      return Reply(res, ForwardBackwardOutputToJson(result.forward_backward()));
    case lathe::v1::OpResult::kOptimStep: {
      json metrics = json::object();
      for (const auto& [key, value] : result.optim_step().metrics()) metrics[key] = value;
      return Reply(res, {{"metrics", std::move(metrics)}});
    }
    case lathe::v1::OpResult::kSaveState:
      return Reply(res, {{"path", TinkerPath(result.save_state().path())}, {"type", "save_weights"}});
    case lathe::v1::OpResult::kSaveWeightsForSampler:
      if (std::optional<std::string> id = samplers.IdOf("save " + view.op_id()); id.has_value()) {
        return Reply(res, {{"sampling_session_id", *id}, {"type", "save_weights_for_sampler"}});
      }
      return Reply(res, {{"path", TinkerPath(result.save_weights_for_sampler().path())},
                         {"type", "save_weights_for_sampler"}});
    case lathe::v1::OpResult::kSample:
      return res.set_content(SampleResponseToProto(result.sample()), kProto);
    case lathe::v1::OpResult::kComputeLogprobs: {
      lathe::v1::SampleResult prompt_only;
      prompt_only.set_prompt_logprobs(result.compute_logprobs().logprobs());
      return res.set_content(SampleResponseToProto(prompt_only), kProto);
    }
    default:
      return Fail(res, 422, "UNIMPLEMENTED", "this operation's result is not served over HTTP yet");
  }
}

HttpDoor::HttpDoor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpDoor::~HttpDoor() { Stop(); }

int HttpDoor::port() const { return impl_->port; }

void HttpDoor::Stop() {
  if (!impl_->thread.joinable()) return;
  impl_->server.stop();
  impl_->thread.join();
}

absl::StatusOr<std::unique_ptr<HttpDoor>> HttpDoor::Start(const HttpOptions& options,
                                                          coordinator::FrontEnd* front_end) {
  if (options.threads < 1) return absl::InvalidArgumentError("--http_threads must be >= 1");
  if (options.port < 0 || options.port > 65535) return absl::InvalidArgumentError("--http_port must be 0..65535");
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->front_end = front_end;
  impl->sessions = std::make_unique<DoorSessions>(options.session_timeout, kMaxSessions);
  const int threads = options.threads;
  impl->server.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  impl->server.set_payload_max_length(static_cast<size_t>(options.max_request_bytes));
  // An idle keep-alive connection holds a pool thread, and Stop waits for it:
  // 2 s (cpp-httplib's default is 5) bounds both while the SDK's polls and
  // submits, which follow each other closely, still reuse connections.
  impl->server.set_keep_alive_timeout(2);
  // cpp-httplib closes a keep-alive connection after 5 requests by default,
  // so a client polling on one connection would reconnect every 5 calls.
  impl->server.set_keep_alive_max_count(100000);
  // A response is written as headers then body: with Nagle's algorithm the
  // body waits for the client's delayed ACK of the headers (~40 ms a call).
  impl->server.set_tcp_nodelay(true);
  // cpp-httplib listens with a backlog of 5, so a burst of new connections
  // (many clients' polls starting at once) past it is reset: the listening
  // socket is captured here and given the system's backlog once bound.
  auto listening = std::make_shared<std::atomic<int>>(-1);
  impl->server.set_socket_options([listening](socket_t sock) {
    int yes = 1;  // what cpp-httplib's default options set (without SO_REUSEPORT)
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    listening->store(sock);
  });
  impl->Routes();
  impl->port = options.port == 0 ? impl->server.bind_to_any_port(options.host)
                                 : (impl->server.bind_to_port(options.host, options.port) ? options.port : -1);
  if (impl->port <= 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for HTTP on ", options.host, ":", options.port));
  }
  if (int sock = listening->load(); sock >= 0) ::listen(sock, SOMAXCONN);
  httplib::Server* server = &impl->server;
  impl->thread = std::thread([server] { server->listen_after_bind(); });
  return std::unique_ptr<HttpDoor>(new HttpDoor(std::move(impl)));
}

}  // namespace lathe::http
