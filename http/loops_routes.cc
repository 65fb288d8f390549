// Baseten Loops' HTTP API on the door (docs/http-api.md, "Loops"): the hook
// that adds its routes, and the calls into the FrontEnd its route files
// share. Every operation goes through the FrontEnd like the Tinker routes'
// do; the door only keeps which lathe run a Loops URL drives and how Loops'
// seq_ids map onto the run's ledger seq_ids.
#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "http/door_impl.h"
#include "http/loops_door.h"

namespace lathe::http {
namespace {

using State = lathe::v1::RetrieveResponse;

// The op's view now (no wait); false if it cannot be read.
bool Peek(const LoopsDoor& door, const std::string& auth, const std::string& op_id, State* view) {
  lathe::v1::RetrieveRequest request;
  request.set_op_id(op_id);
  return door.front_end->Retrieve(auth, request, absl::InfiniteFuture(), view).ok();
}

}  // namespace

void HttpDoor::Impl::LoopsRoutes() {
  loops = std::make_shared<LoopsState>();
  LoopsDoor door{&server, front_end, options.poll_hold, &port, loops.get(),
                 [this](const std::string& path, JsonRoute route) { PostJson(path.c_str(), std::move(route)); }};
  AddLoopsTrainerRoutes(door);
  AddLoopsSamplerRoutes(door);
  AddLoopsControlRoutes(door);
  AddLoopsCheckpointRoutes(door);
}

std::string LoopsSlot(const httplib::Request& req) {
  const std::string slot = req.matches[1];
  return std::string(absl::StripPrefix(slot, "runs/"));
}

std::string LoopsRun(const LoopsDoor& door, const httplib::Request& req) {
  absl::MutexLock lock(&door.st->mu);
  auto it = door.st->trainers.find(LoopsSlot(req));
  return it == door.st->trainers.end() ? std::string() : it->second.run;
}

void LoopsFail(const LoopsDoor& door, httplib::Response& res, const absl::Status& s) {
  if (s.code() == absl::StatusCode::kUnavailable) {
    lathe::v1::HealthResponse health;
    door.front_end->Health(&health);
    const bool ending = health.state() == lathe::v1::HealthResponse::SHUTTING_DOWN;
    return Fail(res, ending ? 503 : 502, "UNAVAILABLE", s.message());
  }
  if (s.code() == absl::StatusCode::kNotFound) return Fail(res, 422, "NOT_FOUND", s.message());
  Fail(res, s);
}

absl::StatusOr<State> AwaitOp(const LoopsDoor& door, const std::string& auth, const std::string& op_id,
                              absl::Duration limit) {
  const absl::Time end = absl::Now() + limit;
  for (;;) {
    lathe::v1::RetrieveRequest request;
    request.set_op_id(op_id);
    request.set_wait_ms(absl::ToInt64Milliseconds(std::min(door.poll_hold, end - absl::Now())));
    State view;
    if (absl::Status s = door.front_end->Retrieve(auth, request, absl::InfiniteFuture(), &view); !s.ok()) return s;
    if (view.state() != State::PENDING || absl::Now() >= end) return view;
  }
}

std::optional<LoopsState::Version> LiveVersion(const LoopsDoor& door, const std::string& auth,
                                               const std::string& run) {
  std::vector<std::string> published;
  {
    absl::MutexLock lock(&door.st->mu);
    published = door.st->books[run].published;
  }
  for (auto it = published.rbegin(); it != published.rend(); ++it) {
    std::optional<LoopsState::Version> version;
    {
      absl::MutexLock lock(&door.st->mu);
      if (auto v = door.st->versions.find(*it); v != door.st->versions.end()) version = v->second;
    }
    State view;
    if (!version.has_value()) {
      if (!Peek(door, auth, *it, &view) || view.state() != State::DONE) continue;
      const lathe::v1::SaveWeightsForSamplerResult& saved = view.result().save_weights_for_sampler();
      version = LoopsState::Version{saved.step(), saved.path()};
    }
    // The newest finished publication is live: older ones are no longer needed.
    absl::MutexLock lock(&door.st->mu);
    std::vector<std::string>& kept = door.st->books[run].published;
    auto live = std::find(kept.begin(), kept.end(), *it);
    if (live != kept.end()) {
      for (auto old = kept.begin(); old != live; ++old) door.st->versions.erase(*old);
      kept.erase(kept.begin(), live);
      door.st->versions[*it] = *version;
    }
    return version;
  }
  return std::nullopt;
}

std::string LoopsBaseModel(const LoopsDoor& door, const httplib::Request& req) {
  lathe::v1::Capabilities caps;
  (void)door.front_end->GetCapabilities(Authorization(req), &caps);
  return caps.base_models_size() > 0 ? caps.base_models(0) : std::string();
}

}  // namespace lathe::http
