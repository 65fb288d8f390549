// Baseten Loops' HTTP API on the door (docs/http-api.md, "Loops"): the hook
// that adds its routes, and the calls into the FrontEnd its route files
// share. Every operation goes through the FrontEnd like the Tinker routes'
// do; the door only keeps which lathe run a Loops URL drives and how Loops'
// seq_ids map onto the run's ledger seq_ids.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "http/door_impl.h"
#include "http/loops_door.h"

namespace lathe::http {
namespace {

using State = lathe::v1::RetrieveResponse;

// The ledger seq_id part of "<run>/<seq>" (-1 if none).
int64_t SeqOfOpId(const std::string& op_id) {
  int64_t seq = -1;
  const size_t slash = op_id.rfind('/');
  if (slash == std::string::npos || !absl::SimpleAtoi(op_id.substr(slash + 1), &seq)) return -1;
  return seq;
}

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

int64_t StepAt(const LoopsDoor& door, const std::string& auth, const std::string& op_id) {
  // The marks before the save, newest first, down to the last init.
  std::vector<std::pair<char, std::string>> before;
  {
    absl::MutexLock lock(&door.st->mu);
    const LoopsState::Book& book = door.st->books[op_id.substr(0, op_id.find('/'))];
    for (auto it = book.marks.lower_bound(SeqOfOpId(op_id)); it != book.marks.begin();) {
      --it;
      if (it->second.first == 'i') break;
      before.push_back(it->second);
    }
  }
  // All finished before the save did (the run's order); failed ones count nothing.
  int64_t steps = 0;
  for (const auto& [kind, id] : before) {
    State view;
    if (!Peek(door, auth, id, &view) || view.state() != State::DONE) continue;
    if (kind == 'l') return steps + view.result().load_state().step();
    ++steps;
  }
  return steps;
}

std::optional<LoopsState::Version> LiveVersion(const LoopsDoor& door, const std::string& auth,
                                               const std::string& run) {
  std::vector<std::string> published;
  {
    absl::MutexLock lock(&door.st->mu);
    published = door.st->books[run].published;
  }
  for (auto it = published.rbegin(); it != published.rend(); ++it) {
    {
      absl::MutexLock lock(&door.st->mu);
      if (auto v = door.st->versions.find(*it); v != door.st->versions.end()) return v->second;
    }
    State view;
    if (!Peek(door, auth, *it, &view) || view.state() != State::DONE) continue;
    LoopsState::Version version{StepAt(door, auth, *it), view.result().save_weights_for_sampler().path()};
    absl::MutexLock lock(&door.st->mu);
    door.st->versions[*it] = version;
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
