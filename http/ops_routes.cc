// The operator's routes on the HTTP door (docs/operations.md): /metrics in
// Prometheus' text format, the page (/ops) and the JSON behind it. Every one
// needs an API key like the rest of the door; a browser brings it in the
// cookie /ops/login sets, accepted on GET requests of these routes only (no
// route that changes anything reads a cookie, so no other site can make a
// browser act with it).
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "http/door_impl.h"
#include "http/ops_assets.h"

namespace lathe::http {
namespace {

using nlohmann::json;

constexpr char kCookie[] = "lathe_api_key";

bool IsOpsPath(const std::string& path) {
  return path == "/metrics" || path == "/ops" || absl::StartsWith(path, "/ops/");
}

void ServeAsset(const char* name, const char* type, httplib::Response& res) {
  std::optional<std::string_view> asset = OpsAsset(name);
  if (!asset.has_value()) return Fail(res, 404, "NOT_FOUND", absl::StrCat("no asset ", name));
  res.set_header("Cache-Control", "no-store");
  res.set_content(std::string(*asset), type);
}

void ReplyStatusOr(httplib::Response& res, const absl::StatusOr<json>& body) {
  if (!body.ok()) return Fail(res, body.status());
  res.set_header("Cache-Control", "no-store");
  Reply(res, *body);
}

}  // namespace

std::string PageAuthorization(const httplib::Request& req) {
  std::string authorization = Authorization(req);
  if (!authorization.empty() || req.method != "GET" || !IsOpsPath(req.path)) return authorization;
  for (absl::string_view part : absl::StrSplit(req.get_header_value("Cookie"), ';')) {
    part = absl::StripAsciiWhitespace(part);
    if (absl::ConsumePrefix(&part, kCookie) && absl::ConsumePrefix(&part, "=")) {
      return "Bearer " + httplib::detail::decode_url(std::string(part), false);
    }
  }
  return "";
}

bool IsOpenPage(const httplib::Request& req) { return req.path == "/ops/login"; }

void RefusePage(const httplib::Request& req, const absl::Status& refusal, httplib::Response& res) {
  if (req.method == "GET" && (req.path == "/ops" || req.path == "/ops/")) {
    // A browser without the cookie: the login form, with the refusal's status.
    ServeAsset("login.html", "text/html; charset=utf-8", res);
    res.status = 401;
    return;
  }
  Fail(res, refusal);
}

void HttpDoor::Impl::OpsRoutes() {
  const coordinator::OpsView* ops = options.ops;
  if (ops == nullptr) return;
  server.Get("/metrics", [ops](const httplib::Request&, httplib::Response& res) {
    res.set_content(ops->MetricsText(), "text/plain; version=0.0.4; charset=utf-8");
  });
  server.Get("/ops/login", [](const httplib::Request&, httplib::Response& res) {
    ServeAsset("login.html", "text/html; charset=utf-8", res);
  });
  // The form's key, checked like any other; a good one is kept in an
  // HttpOnly cookie for the page's GET requests.
  server.Post("/ops/login", [this](const httplib::Request& req, httplib::Response& res) {
    const std::string key = req.get_param_value("key");
    if (absl::Status s = front_end->Authorize("Bearer " + key); !s.ok() || key.empty()) {
      ServeAsset("login.html", "text/html; charset=utf-8", res);
      res.status = 401;
      return;
    }
    res.set_header("Set-Cookie", absl::StrCat(kCookie, "=", httplib::detail::encode_query_param(key),
                                              "; Path=/; HttpOnly; SameSite=Strict"));
    res.set_redirect("/ops", 303);
  });
  for (const char* path : {"/ops", "/ops/"}) {
    server.Get(path, [](const httplib::Request&, httplib::Response& res) {
      ServeAsset("index.html", "text/html; charset=utf-8", res);
    });
  }
  server.Get("/ops/static/ops.js", [](const httplib::Request&, httplib::Response& res) {
    ServeAsset("ops.js", "text/javascript; charset=utf-8", res);
  });
  server.Get("/ops/static/ops.css", [](const httplib::Request&, httplib::Response& res) {
    ServeAsset("ops.css", "text/css; charset=utf-8", res);
  });
  server.Get("/ops/api/deployment", [ops](const httplib::Request&, httplib::Response& res) {
    ReplyStatusOr(res, ops->Deployment());
  });
  server.Get("/ops/api/runs", [ops](const httplib::Request&, httplib::Response& res) {
    ReplyStatusOr(res, json{{"runs", ops->Runs()}});
  });
  server.Get(R"(/ops/api/runs/([^/]{1,200})/history)", [ops](const httplib::Request& req, httplib::Response& res) {
    ReplyStatusOr(res, ops->History(req.matches[1].str()));
  });
  server.Get(R"(/ops/api/runs/([^/]{1,200})/checkpoints)", [ops](const httplib::Request& req, httplib::Response& res) {
    ReplyStatusOr(res, ops->Checkpoints(req.matches[1].str()));
  });
}

}  // namespace lathe::http
