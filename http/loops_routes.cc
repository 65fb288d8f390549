// Baseten Loops' HTTP API on the door (docs/http-api.md, "Loops"): the
// trainer and sampler routes of a run (/loops/runs/<run>/...) and of local
// mode (/loops/local/...), and the self-hosted control plane (/v1/loops/...).
// Every operation goes through the FrontEnd like the Tinker routes' do; the
// door only keeps which lathe run a Loops URL drives and how Loops' seq_ids
// map onto the run's ledger seq_ids.
#include <algorithm>
#include <cctype>
#include <deque>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "http/door_impl.h"
#include "http/loops_convert.h"
#include "http/tinker_convert.h"
#include "runtime/checkpoint_path.h"
#include "runtime/quote.h"

namespace lathe::http {
namespace {

using nlohmann::json;
using State = lathe::v1::RetrieveResponse;

// A trainer base URL: /loops/local or /loops/runs/<run>; its sampler is
// <trainer>/sampler.
constexpr char kTrainer[] = R"(/loops/(local|runs/[A-Za-z0-9._-]{1,128}))";
constexpr char kLocal[] = "local";
constexpr size_t kKeysKept = 4096;
// How long a gated /sample waits for a publication in flight before its 408.
constexpr absl::Duration kGateHold = absl::Seconds(10);

// "local", or the run id of runs/<run>.
std::string SlotOf(const httplib::Request& req) {
  const std::string slot = req.matches[1];
  return std::string(absl::StripPrefix(slot, "runs/"));
}

// What the helpers below need of the door.
struct Door {
  coordinator::FrontEnd* front_end;
  absl::Duration poll_hold;
};

// The ledger seq_id part of "<run>/<seq>" (-1 if none).
int64_t SeqOfOpId(const std::string& op_id) {
  int64_t seq = -1;
  const size_t slash = op_id.rfind('/');
  if (slash == std::string::npos || !absl::SimpleAtoi(op_id.substr(slash + 1), &seq)) return -1;
  return seq;
}

std::string RunOfOpId(const std::string& op_id) { return op_id.substr(0, op_id.find('/')); }

std::string Iso8601(absl::Time t) { return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", t, absl::UTCTimeZone()); }

}  // namespace

// What the door remembers of the Loops URLs it serves.
struct LoopsState {
  // A trainer URL: the run it drives now and the seq_id mapping.
  struct Trainer {
    std::string run;          // "" before the first init (local mode)
    int64_t offset = 0;       // ledger seq_id = offset + Loops seq_id
    int64_t last = 0;         // the highest ledger seq_id given to the run
    bool fresh = false;       // made by the control plane: its creation is the first init's
    int32_t lora_rank = 0;    // as created
    std::string created_op;   // the creation's init op
    std::string session_id;   // control plane runs
    absl::Time created_at;
  };
  // A run's operations that change its optimizer step, and its publications.
  struct Book {
    std::map<int64_t, std::pair<char, std::string>> marks;  // ledger seq_id -> (i init, l load, o optim, op id)
    std::vector<std::string> published;  // bump_version saves since the last init, oldest first
  };
  struct Version {
    int64_t step = 0;
    std::string path;  // lathe://<run>/sampler_weights/<name>
  };
  absl::Mutex init_mu;  // one init at a time
  absl::Mutex mu;
  std::map<std::string, Trainer> trainers ABSL_GUARDED_BY(mu);  // "local" or a run id
  std::map<std::string, Book> books ABSL_GUARDED_BY(mu);        // by run id
  std::map<std::string, Version> versions ABSL_GUARDED_BY(mu);  // finished save op id -> its version
  std::map<std::string, std::string> inits ABSL_GUARDED_BY(mu);  // "<slot> <Idempotency-Key>" -> op id
  std::deque<std::string> inits_order ABSL_GUARDED_BY(mu);
};

namespace {

// An error a Loops client acts on correctly: never 400/404 for a permanent
// one at submit (retried for an hour), 503 only while shutting down, 502
// (retried) while the deployment is starting.
void LoopsFail(coordinator::FrontEnd* front_end, httplib::Response& res, const absl::Status& s) {
  if (s.code() == absl::StatusCode::kUnavailable) {
    lathe::v1::HealthResponse health;
    front_end->Health(&health);
    const bool ending = health.state() == lathe::v1::HealthResponse::SHUTTING_DOWN;
    return Fail(res, ending ? 503 : 502, "UNAVAILABLE", s.message());
  }
  if (s.code() == absl::StatusCode::kNotFound) return Fail(res, 422, "NOT_FOUND", s.message());
  Fail(res, s);
}

// Waits for op_id to finish (up to `limit`): its view, or the error.
absl::StatusOr<lathe::v1::RetrieveResponse> Await(const Door& door, const std::string& auth,
                                                  const std::string& op_id, absl::Duration limit) {
  const absl::Time end = absl::Now() + limit;
  for (;;) {
    lathe::v1::RetrieveRequest request;
    request.set_op_id(op_id);
    request.set_wait_ms(absl::ToInt64Milliseconds(std::min(door.poll_hold, end - absl::Now())));
    lathe::v1::RetrieveResponse view;
    if (absl::Status s = door.front_end->Retrieve(auth, request, absl::InfiniteFuture(), &view); !s.ok()) return s;
    if (view.state() != State::PENDING || absl::Now() >= end) return view;
  }
}

// The run's optimizer step when the save at `op_id` ran: the steps counted
// from its last init or load before it (all finished, as the save did).
int64_t StepAt(const Door& door, LoopsState& st, const std::string& auth, const std::string& op_id) {
  std::vector<std::pair<char, std::string>> before;
  {
    absl::MutexLock lock(&st.mu);
    const LoopsState::Book& book = st.books[RunOfOpId(op_id)];
    const int64_t seq = SeqOfOpId(op_id);
    for (auto it = book.marks.lower_bound(seq); it != book.marks.begin();) {
      --it;
      before.push_back(it->second);
      if (it->second.first == 'i') break;
    }
  }
  int64_t steps = 0;
  for (const auto& [kind, id] : before) {
    if (kind == 'i') break;
    lathe::v1::RetrieveRequest request;
    request.set_op_id(id);
    lathe::v1::RetrieveResponse view;
    if (!door.front_end->Retrieve(auth, request, absl::InfiniteFuture(), &view).ok()) continue;
    if (view.state() != State::DONE) continue;
    if (kind == 'l') return steps + view.result().load_state().step();
    ++steps;
  }
  return steps;
}

// The run's live version: its newest finished bump_version save.
std::optional<LoopsState::Version> Live(const Door& door, LoopsState& st, const std::string& auth,
                                        const std::string& run) {
  std::vector<std::string> published;
  {
    absl::MutexLock lock(&st.mu);
    published = st.books[run].published;
  }
  for (auto it = published.rbegin(); it != published.rend(); ++it) {
    {
      absl::MutexLock lock(&st.mu);
      if (auto v = st.versions.find(*it); v != st.versions.end()) return v->second;
    }
    lathe::v1::RetrieveRequest request;
    request.set_op_id(*it);
    lathe::v1::RetrieveResponse view;
    if (!door.front_end->Retrieve(auth, request, absl::InfiniteFuture(), &view).ok()) continue;
    if (view.state() != State::DONE) continue;
    LoopsState::Version version{StepAt(door, st, auth, *it), view.result().save_weights_for_sampler().path()};
    absl::MutexLock lock(&st.mu);
    st.versions[*it] = version;
    return version;
  }
  return std::nullopt;
}

// The Loops result of a finished operation.
json ResultJson(const Door& door, LoopsState& st, const std::string& auth, const lathe::v1::RetrieveResponse& view) {
  const lathe::v1::OpResult& result = view.result();
  switch (result.result_case()) {
    case lathe::v1::OpResult::kInit:
      return {{"step", result.init().step()}, {"lora_rank", result.init().lora().rank()}};
    case lathe::v1::OpResult::kForwardBackward:
      return LoopsForwardBackwardOutput(result.forward_backward());
    case lathe::v1::OpResult::kOptimStep: {
      json metrics = json::object();
      for (const auto& [key, value] : result.optim_step().metrics()) metrics[key] = value;
      return {{"metrics", std::move(metrics)}};
    }
    case lathe::v1::OpResult::kSaveState:
      return {{"mode", ""}, {"path", BtPath(result.save_state().path())}};
    case lathe::v1::OpResult::kLoadState:
      return {{"step", result.load_state().step()}};
    case lathe::v1::OpResult::kSaveWeightsForSampler:
      return {{"version", StepAt(door, st, auth, view.op_id())},
              {"path", BtPath(result.save_weights_for_sampler().path())}};
    default:
      return json::object();
  }
}

// The scheme and host the caller reached the door on.
std::string Origin(const httplib::Request& req, int port) {
  const std::string host = req.get_header_value("Host");
  return absl::StrCat("http://", host.empty() ? absl::StrCat("127.0.0.1:", port) : host);
}

json RunJson(const httplib::Request& req, int port, const std::string& run, const LoopsState::Trainer& t,
             const std::string& base_model) {
  const std::string base = absl::StrCat(Origin(req, port), "/loops/runs/", run);
  return {{"id", run},
          {"session_id", t.session_id},
          {"base_model", base_model},
          {"base_url", base},
          {"deployment_id", run},
          {"created_at", Iso8601(t.created_at)},
          {"sampler",
           {{"id", "sampler-" + run},
            {"base_url", base + "/sampler"},
            {"base_model", base_model},
            {"model_id", "lathe"},
            {"deployment_id", run},
            {"created_at", Iso8601(t.created_at)},
            {"status", {{"name", "ACTIVE"}}}}}};
}

// "<run>:<kind>:<name>" (no slash, so it fits one path segment) <->
// lathe://<run>/<kind>/<name>.
std::string CheckpointId(const std::string& lathe_path) {
  std::string id(absl::StripPrefix(lathe_path, "lathe://"));
  std::replace(id.begin(), id.end(), '/', ':');
  return id;
}

std::string PathOfId(std::string id) {
  std::replace(id.begin(), id.end(), ':', '/');
  return "lathe://" + id;
}

}  // namespace

void HttpDoor::Impl::LoopsRoutes() {
  loops = std::make_shared<LoopsState>();
  LoopsState* st = loops.get();
  const std::string trainer = kTrainer;

  // Submits one ordered operation of the URL's run at Loops seq_id `seq`
  // and answers {"operation_id"}. `mark`: how the op changes the run's
  // optimizer step (0: not at all).
  auto submit = [this, st](const httplib::Request& req, const json& body, httplib::Response& res, char mark,
                           bool bump, const std::function<absl::Status(lathe::v1::SubmitRequest*)>& fill) {
    const std::string slot = SlotOf(req);
    const int64_t seq = Number<int64_t>(body.at("seq_id"), "seq_id");
    if (seq < 1 || seq > (int64_t{1} << 62)) {
      return Fail(res, 422, "INVALID_ARGUMENT", absl::StrCat("seq_id ", seq, " is out of range"));
    }
    lathe::v1::SubmitRequest op;
    {
      absl::MutexLock lock(&st->mu);
      auto it = st->trainers.find(slot);
      if (it == st->trainers.end() || it->second.run.empty()) {
        return Fail(res, 422, "FAILED_PRECONDITION",
                    slot == kLocal ? "no trainer yet: call init_trainer_server first"
                                   : "no Loops run " + runtime::QuoteForMessage(slot) + " on this deployment");
      }
      op.set_run_id(it->second.run);
      op.set_seq_id(it->second.offset + seq);
    }
    if (op.seq_id() < 1) return Fail(res, 422, "INVALID_ARGUMENT", "seq_id 1 is init_trainer_server's");
    absl::Status s;
    try {
      s = fill(&op);
    } catch (const json::exception& e) {
      s = absl::InvalidArgumentError(absl::StrCat("the body does not have the route's shape: ", e.what()));
    }
    lathe::v1::SubmitResponse response;
    if (s.ok()) s = front_end->Submit(Authorization(req), op, &response);
    if (!s.ok()) {
      // The SDK numbers its next operations on past a refused one, so its
      // seq_id becomes a noop: the run's order goes on.
      if (s.code() == absl::StatusCode::kInvalidArgument || s.code() == absl::StatusCode::kUnimplemented) {
        lathe::v1::SubmitRequest noop;
        noop.set_run_id(op.run_id());
        noop.set_seq_id(op.seq_id());
        noop.mutable_noop();
        lathe::v1::SubmitResponse filled;
        if (front_end->Submit(Authorization(req), noop, &filled).ok()) {
          absl::MutexLock lock(&st->mu);
          LoopsState::Trainer& t = st->trainers[slot];
          if (t.run == op.run_id()) t.last = std::max(t.last, op.seq_id());
        }
      }
      return LoopsFail(front_end, res, s);
    }
    {
      absl::MutexLock lock(&st->mu);
      LoopsState::Trainer& t = st->trainers[slot];
      if (t.run == op.run_id()) t.last = std::max(t.last, op.seq_id());
      LoopsState::Book& book = st->books[op.run_id()];
      if (mark != 0) book.marks[op.seq_id()] = {mark, response.op_id()};
      if (mark == 'i') book.published.clear();
      if (bump && std::find(book.published.begin(), book.published.end(), response.op_id()) == book.published.end()) {
        book.published.push_back(response.op_id());
      }
    }
    res.status = 202;
    res.set_header("Location", "/operations/" + response.op_id());
    Reply(res, {{"operation_id", response.op_id()}, {"schema_version", 1}});
  };

  PostJson((trainer + "/init_trainer_server").c_str(), [this, st, submit](auto& req, const json& body, auto& res) {
    const int32_t rank = Number<int32_t>(body.at("lora_rank"), "lora_rank");
    const int64_t seq = Number<int64_t>(body.at("seq_id"), "seq_id");
    auto init = [rank](lathe::v1::SubmitRequest* op) {
      op->mutable_init()->mutable_lora()->set_rank(rank);
      return absl::OkStatus();
    };
    // Later in a client's sequence: a re-init in its order.
    if (seq != 1) return submit(req, body, res, 'i', false, init);
    // seq_id 1: a new TrainingClient.
    const std::string slot = SlotOf(req);
    const std::string auth = Authorization(req);
    const std::string key = req.get_header_value("Idempotency-Key");
    absl::MutexLock init_lock(&st->init_mu);
    auto answer = [&](const std::string& op_id) {
      absl::MutexLock lock(&st->mu);
      if (!key.empty()) {
        st->inits[slot + " " + key] = op_id;
        st->inits_order.push_back(slot + " " + key);
        if (st->inits_order.size() > kKeysKept) {
          st->inits.erase(st->inits_order.front());
          st->inits_order.pop_front();
        }
      }
      res.status = 202;
      Reply(res, {{"operation_id", op_id}, {"schema_version", 1}});
    };
    LoopsState::Trainer t;
    {
      absl::MutexLock lock(&st->mu);
      if (auto it = st->inits.find(slot + " " + key); !key.empty() && it != st->inits.end()) {
        res.status = 202;
        return Reply(res, {{"operation_id", it->second}, {"schema_version", 1}});
      }
      auto it = st->trainers.find(slot);
      if (it == st->trainers.end() && slot != kLocal) {
        return Fail(res, 422, "NOT_FOUND", "no Loops run " + runtime::QuoteForMessage(slot) + " on this deployment");
      }
      if (it != st->trainers.end()) t = it->second;
    }
    if (slot == kLocal) {
      // Local mode: every new client trains a fresh run; the previous one
      // ends first (its checkpoints stay), so --max_runs holds.
      if (!t.run.empty()) {
        lathe::v1::SubmitRequest end;
        end.set_run_id(t.run);
        end.set_seq_id(t.last + 1);
        end.mutable_delete_run();
        lathe::v1::SubmitResponse ended;
        if (front_end->Submit(auth, end, &ended).ok()) (void)Await(Door{front_end, options.poll_hold}, auth, ended.op_id(), absl::Minutes(2));
      }
      lathe::v1::CreateRunRequest create;
      create.set_base_model(body.value("base_model", ""));
      create.mutable_lora()->set_rank(rank);
      lathe::v1::CreateRunResponse created;
      if (absl::Status s = front_end->CreateRun(auth, create, &created); !s.ok()) return LoopsFail(front_end, res, s);
      {
        absl::MutexLock lock(&st->mu);
        LoopsState::Trainer& now = st->trainers[kLocal];
        now = LoopsState::Trainer{};
        now.run = created.run_id();
        now.offset = -1;
        now.lora_rank = rank;
        now.created_op = created.init_op_id();
        now.created_at = absl::Now();
        st->books[now.run].marks[0] = {'i', created.init_op_id()};
      }
      return answer(created.init_op_id());
    }
    if (t.fresh && t.lora_rank == rank) {
      // The run's creation was this init.
      {
        absl::MutexLock lock(&st->mu);
        LoopsState::Trainer& now = st->trainers[slot];
        now.fresh = false;
        now.offset = -1;
      }
      return answer(t.created_op);
    }
    // Another client on the run: a re-init after everything given so far.
    lathe::v1::SubmitRequest op;
    op.set_run_id(slot);
    op.set_seq_id(t.last + 1);
    (void)init(&op);
    lathe::v1::SubmitResponse response;
    if (absl::Status s = front_end->Submit(auth, op, &response); !s.ok()) return LoopsFail(front_end, res, s);
    {
      absl::MutexLock lock(&st->mu);
      LoopsState::Trainer& now = st->trainers[slot];
      now.fresh = false;
      now.offset = t.last;
      now.last = std::max(now.last, op.seq_id());
      LoopsState::Book& book = st->books[slot];
      book.marks[op.seq_id()] = {'i', response.op_id()};
      book.published.clear();
    }
    answer(response.op_id());
  });
  for (const char* route : {"/forward_backward", "/forward"}) {
    const bool forward_only = std::string(route) == "/forward";
    PostJson((trainer + route).c_str(), [submit, forward_only](auto& req, const json& body, auto& res) {
      submit(req, body, res, 0, false, [&](lathe::v1::SubmitRequest* op) {
        return LoopsForwardBackwardFromJson(body, forward_only, op->run_id(), op->seq_id(), op);
      });
    });
  }
  PostJson((trainer + "/optim_step").c_str(), [submit](auto& req, const json& body, auto& res) {
    submit(req, body, res, 'o', false, [&](lathe::v1::SubmitRequest* op) {
      *op->mutable_optim_step() = AdamFromJson(body.value("adam_params", json::object()));
      return absl::OkStatus();
    });
  });
  PostJson((trainer + "/save_state").c_str(), [submit](auto& req, const json& body, auto& res) {
    submit(req, body, res, 0, false, [&](lathe::v1::SubmitRequest* op) {
      op->mutable_save_state()->set_name(body.at("name").get<std::string>());
      if (body.contains("ttl_seconds") && !body.at("ttl_seconds").is_null()) {
        op->mutable_save_state()->set_ttl_seconds(Number<int64_t>(body.at("ttl_seconds"), "ttl_seconds"));
      }
      return absl::OkStatus();
    });
  });
  for (const char* route : {"/load_state", "/load_state_with_optimizer"}) {
    const bool with_optimizer = std::string(route) == "/load_state_with_optimizer";
    PostJson((trainer + route).c_str(), [submit, with_optimizer](auto& req, const json& body, auto& res) {
      submit(req, body, res, 'l', false, [&](lathe::v1::SubmitRequest* op) {
        const std::string bt = body.at("path").get<std::string>();
        const std::string path = LatheFromBt(bt);
        if (path.empty()) {
          return absl::InvalidArgumentError("path must be bt://loops:<run>/weights/<name>, not " +
                                            runtime::QuoteForMessage(bt));
        }
        (with_optimizer ? op->mutable_load_state_with_optimizer() : op->mutable_load_state())->set_path(path);
        return absl::OkStatus();
      });
    });
  }
  PostJson((trainer + "/save_weights_for_sampler").c_str(), [submit](auto& req, const json& body, auto& res) {
    const bool bump = body.value("bump_version", false);
    submit(req, body, res, 0, bump, [&](lathe::v1::SubmitRequest* op) {
      op->mutable_save_weights_for_sampler()->set_name(body.at("name").get<std::string>());
      if (body.contains("ttl_seconds") && !body.at("ttl_seconds").is_null()) {
        op->mutable_save_weights_for_sampler()->set_ttl_seconds(Number<int64_t>(body.at("ttl_seconds"), "ttl_seconds"));
      }
      return absl::OkStatus();
    });
  });
  // cpp-httplib decodes the path, so an id the SDK quoted (%2F) arrives
  // with its slash.
  server.Get(trainer + "/operations/(.+)", [this, st](const httplib::Request& req, httplib::Response& res) {
    const std::string auth = Authorization(req);
    const std::string op_id = req.matches[2];
    lathe::v1::RetrieveRequest request;
    request.set_op_id(op_id);
    request.set_wait_ms(absl::ToInt64Milliseconds(options.poll_hold));
    lathe::v1::RetrieveResponse view;
    if (absl::Status s = front_end->Retrieve(auth, request, absl::InfiniteFuture(), &view); !s.ok()) {
      if (s.code() == absl::StatusCode::kNotFound || s.code() == absl::StatusCode::kInvalidArgument) {
        return Fail(res, 404, "NOT_FOUND", s.message());
      }
      return LoopsFail(front_end, res, s);
    }
    if (view.state() == State::PENDING) {
      res.status = 408;
      return Reply(res, {{"status", "pending"}, {"operation_id", view.op_id()}});
    }
    if (view.state() == State::FAILED) {
      const bool user = view.error().category() == lathe::v1::OpError::USER;
      return Reply(res, {{"status", "error"},
                         {"error", runtime::TruncateMessage(view.error().message(), 4096)},
                         {"error_class", user ? "ValueError" : "ServerError"}});
    }
    Reply(res, {{"status", "done"}, {"result", ResultJson(Door{front_end, options.poll_hold}, *st, auth, view)}});
  });
  server.Get(trainer + "/health", [this, st](const httplib::Request& req, httplib::Response& res) {
    const std::string slot = SlotOf(req);
    {
      absl::MutexLock lock(&st->mu);
      if (slot != kLocal && st->trainers.count(slot) == 0) {
        return Fail(res, 404, "NOT_FOUND", "no Loops run " + runtime::QuoteForMessage(slot));
      }
    }
    lathe::v1::HealthResponse health;
    front_end->Health(&health);
    const bool serving = health.state() == lathe::v1::HealthResponse::SERVING;
    res.status = serving ? 200 : 503;
    Reply(res, {{"status", serving ? "ok" : "unavailable"}, {"detail", health.detail()}});
  });
  // The run a trainer or sampler URL drives now ("" none yet).
  auto run_of = [st](const httplib::Request& req) {
    absl::MutexLock lock(&st->mu);
    auto it = st->trainers.find(SlotOf(req));
    return it == st->trainers.end() ? std::string() : it->second.run;
  };
  server.Get(trainer + "/policy_version", [this, run_of](const httplib::Request& req, httplib::Response& res) {
    const std::string run = run_of(req);
    if (run.empty()) return Reply(res, {{"policy_version", 0}});
    lathe::v1::GetInfoRequest request;
    request.set_run_id(run);
    lathe::v1::RunInfo info;
    if (absl::Status s = front_end->GetInfo(Authorization(req), request, &info); !s.ok()) return Fail(res, s);
    Reply(res, {{"policy_version", info.step()}});
  });

  // The sampler: the run's live version (its newest bump_version save), or
  // the base model while it has published none.
  server.Post(trainer + "/sampler/sample", [this, st, run_of](const httplib::Request& req, httplib::Response& res) {
    const std::string auth = Authorization(req);
    json body;
    try {
      body = json::parse(req.body);
    } catch (const json::exception& e) {
      return Fail(res, 422, "INVALID_ARGUMENT", absl::StrCat("the body is not JSON: ", e.what()));
    }
    if (!body.is_object()) return Fail(res, 422, "INVALID_ARGUMENT", "the body must be a JSON object");
    const std::string run = run_of(req);
    if (run.empty()) return Fail(res, 422, "FAILED_PRECONDITION", "no trainer yet: call init_trainer_server first");
    int64_t floor = 0;
    if (req.has_header("X-Min-Policy-Version") &&
        !absl::SimpleAtoi(req.get_header_value("X-Min-Policy-Version"), &floor)) {
      return Fail(res, 422, "INVALID_ARGUMENT", "X-Min-Policy-Version must be an integer");
    }
    if (req.has_header("X-Checkpoint-Path")) {
      return Fail(res, 422, "UNIMPLEMENTED", "X-Checkpoint-Path is not supported; sample the live version");
    }
    std::optional<LoopsState::Version> live = Live(Door{front_end, options.poll_hold}, *st, auth, run);
    if (floor > 0 && (!live.has_value() || live->step < floor)) {
      // A publication still running may bring the version: wait a little.
      std::string newest;
      {
        absl::MutexLock lock(&st->mu);
        const auto& published = st->books[run].published;
        if (!published.empty()) newest = published.back();
      }
      if (!newest.empty()) (void)Await(Door{front_end, options.poll_hold}, auth, newest, kGateHold);
      live = Live(Door{front_end, options.poll_hold}, *st, auth, run);
    }
    const int64_t version = live.has_value() ? live->step : 0;
    res.set_header("x-trainers-policy-version", std::to_string(version));
    if (floor > 0 && version < floor) {
      res.status = 408;
      return Reply(res, {{"error", {{"type", "Timeout"},
                                    {"message", absl::StrCat("policy version ", floor, " is not live yet (live: ",
                                                             version, ")")}}}});
    }
    lathe::v1::SubmitRequest op;
    op.set_run_id(run);
    op.set_seq_id(1);
    try {
      if (absl::Status s = LoopsSampleFromJson(body, op.mutable_sample()); !s.ok()) return Fail(res, s);
    } catch (const json::exception& e) {
      return Fail(res, 422, "INVALID_ARGUMENT", absl::StrCat("the body does not have /sample's shape: ", e.what()));
    }
    if (live.has_value()) {
      op.mutable_sample()->set_model_path(live->path);
    } else {
      op.mutable_sample()->set_base(true);
    }
    // Each request is its own lane; a retry with the same key is the same op.
    std::string lane;
    for (char c : req.get_header_value("Idempotency-Key")) {
      if (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_') lane += c;
    }
    lane = lane.empty() ? NewId("loops") : "loops-" + lane.substr(0, 50);
    lathe::v1::SubmitResponse response;
    if (absl::Status s = front_end->SubmitSampling(auth, op, lane, &response); !s.ok()) {
      return LoopsFail(front_end, res, s);
    }
    absl::StatusOr<lathe::v1::RetrieveResponse> view;
    do {
      view = Await(Door{front_end, options.poll_hold}, auth, response.op_id(), absl::Minutes(10));
    } while (view.ok() && view->state() == State::PENDING);
    if (!view.ok()) return LoopsFail(front_end, res, view.status());
    if (view->state() == State::FAILED) {
      const bool user = view->error().category() == lathe::v1::OpError::USER;
      return Fail(res, user ? 422 : 500, user ? "INVALID_ARGUMENT" : "INTERNAL", view->error().message());
    }
    lathe::v1::Capabilities caps;
    (void)front_end->GetCapabilities(auth, &caps);
    const std::string base = caps.base_models_size() > 0 ? caps.base_models(0) : "";
    Reply(res, LoopsCompletion(op.sample(), view->result().sample(), live.has_value() ? "default" : base));
  });
  server.Get(trainer + "/sampler/v1/models", [this, st, run_of](const httplib::Request& req, httplib::Response& res) {
    const std::string auth = Authorization(req);
    lathe::v1::Capabilities caps;
    if (absl::Status s = front_end->GetCapabilities(auth, &caps); !s.ok()) return Fail(res, s);
    const std::string base = caps.base_models_size() > 0 ? caps.base_models(0) : "";
    json data = json::array({{{"id", base}, {"object", "model"}, {"parent", nullptr},
                              {"max_model_len", caps.max_seq_len()}}});
    const std::string run = run_of(req);
    if (!run.empty() && Live(Door{front_end, options.poll_hold}, *st, auth, run).has_value()) {
      data.push_back({{"id", "default"}, {"object", "model"}, {"parent", base}});
    }
    Reply(res, {{"object", "list"}, {"data", std::move(data)}});
  });
  server.Get(trainer + "/sampler/trainers_policy_version",
             [this, st, run_of](const httplib::Request& req, httplib::Response& res) {
               const std::string run = run_of(req);
               std::optional<LoopsState::Version> live;
               if (!run.empty()) live = Live(Door{front_end, options.poll_hold}, *st, Authorization(req), run);
               Reply(res, {{"policy_version", live.has_value() ? live->step : 0}});
             });

  // ---- The control plane of a self-hosted deployment -------------------
  server.Get("/v1/loops/capabilities", [this](const httplib::Request& req, httplib::Response& res) {
    lathe::v1::Capabilities caps;
    if (absl::Status s = front_end->GetCapabilities(Authorization(req), &caps); !s.ok()) return Fail(res, s);
    json models = json::array();
    for (const std::string& name : caps.base_models()) {
      models.push_back({{"model_name", name}, {"max_context_length", caps.max_seq_len()}});
    }
    Reply(res, {{"supported_models", std::move(models)}});
  });
  // Sessions hold nothing; the SDK posts without a body.
  server.Post("/v1/loops/sessions", [](const httplib::Request&, httplib::Response& res) {
    Reply(res, {{"session", {{"id", NewId("session")}}}});
  });
  server.Get(R"(/v1/loops/sessions/([A-Za-z0-9._-]{1,128}))", [](const httplib::Request& req, httplib::Response& res) {
    Reply(res, {{"session", {{"id", req.matches[1].str()}}}});
  });
  auto create_run = [this, st](const httplib::Request& req, const json& body, httplib::Response& res) {
    const std::string auth = Authorization(req);
    lathe::v1::Capabilities caps;
    if (absl::Status s = front_end->GetCapabilities(auth, &caps); !s.ok()) return Fail(res, s);
    const std::string base_model = body.value("base_model", "");
    if (base_model.empty()) return Fail(res, 422, "INVALID_ARGUMENT", "base_model is required");
    auto given = [&body](const char* key) { return body.contains(key) && !body.at(key).is_null(); };
    if (given("max_seq_len") && Number<int64_t>(body.at("max_seq_len"), "max_seq_len") > caps.max_seq_len()) {
      return Fail(res, 422, "INVALID_ARGUMENT",
                  absl::StrCat("max_seq_len ", body.at("max_seq_len").dump(), " is past this deployment's ",
                               caps.max_seq_len()));
    }
    if (given("replicas")) {
      const int64_t replicas = Number<int64_t>(body.at("replicas"), "replicas");
      if (replicas < 1 || replicas > caps.layout().replicas()) {
        return Fail(res, 422, "INVALID_ARGUMENT",
                    absl::StrCat("replicas must be 1..", caps.layout().replicas(),
                                 ": every run trains on all of this deployment's ", caps.layout().replicas(),
                                 " replica(s)"));
      }
    }
    for (const char* key : {"path", "base_checkpoint", "reuse_from_run_id", "reuse_from_session_id"}) {
      if (given(key)) return Fail(res, 422, "UNIMPLEMENTED", absl::StrCat(key, " is not supported"));
    }
    lathe::v1::CreateRunRequest create;
    create.set_base_model(base_model);
    create.mutable_lora()->set_rank(given("lora_rank") ? Number<int32_t>(body.at("lora_rank"), "lora_rank") : 64);
    if (given("seed")) create.mutable_lora()->set_seed(Number<int64_t>(body.at("seed"), "seed"));
    lathe::v1::CreateRunResponse created;
    if (absl::Status s = front_end->CreateRun(auth, create, &created); !s.ok()) return LoopsFail(front_end, res, s);
    LoopsState::Trainer t;
    t.run = created.run_id();
    t.offset = -1;
    t.fresh = true;
    t.lora_rank = create.lora().rank();
    t.created_op = created.init_op_id();
    t.session_id = body.value("session_id", "");
    t.created_at = absl::Now();
    {
      absl::MutexLock lock(&st->mu);
      st->trainers[t.run] = t;
      st->books[t.run].marks[0] = {'i', created.init_op_id()};
    }
    Reply(res, {{"run", RunJson(req, port, t.run, t, caps.base_models(0))}});
  };
  PostJson("/v1/loops/runs", create_run);
  PostJson("/v1/loops/trainers", create_run);
  // The run (and its paired sampler) of a run id the control plane made.
  auto find_run = [st](const std::string& run) -> std::optional<LoopsState::Trainer> {
    absl::MutexLock lock(&st->mu);
    auto it = st->trainers.find(run);
    if (it == st->trainers.end() || run == kLocal) return std::nullopt;
    return it->second;
  };
  auto base_model_of = [this](const httplib::Request& req) {
    lathe::v1::Capabilities caps;
    (void)front_end->GetCapabilities(Authorization(req), &caps);
    return caps.base_models_size() > 0 ? caps.base_models(0) : std::string();
  };
  server.Get(R"(/v1/loops/runs/([A-Za-z0-9._-]{1,128}))",
             [this, find_run, base_model_of](const httplib::Request& req, httplib::Response& res) {
               std::optional<LoopsState::Trainer> t = find_run(req.matches[1].str());
               if (!t.has_value()) return Fail(res, 404, "NOT_FOUND", "no Loops run " + runtime::QuoteForMessage(req.matches[1].str()));
               Reply(res, {{"run", RunJson(req, port, t->run, *t, base_model_of(req))}});
             });
  server.Get(R"(/v1/loops/deployments/([A-Za-z0-9._-]{1,128}))",
             [this, find_run, base_model_of](const httplib::Request& req, httplib::Response& res) {
               std::optional<LoopsState::Trainer> t = find_run(req.matches[1].str());
               if (!t.has_value()) {
                 return Fail(res, 404, "NOT_FOUND", "no deployment " + runtime::QuoteForMessage(req.matches[1].str()));
               }
               lathe::v1::HealthResponse health;
               front_end->Health(&health);
               const bool serving = health.state() == lathe::v1::HealthResponse::SERVING;
               Reply(res, {{"deployment",
                            {{"id", t->run},
                             {"base_model", base_model_of(req)},
                             {"base_url", absl::StrCat(Origin(req, port), "/loops/runs/", t->run)},
                             {"status", {{"name", serving ? "ACTIVE" : "UNHEALTHY"}}}}}});
             });
  server.Get(R"(/v1/models/([A-Za-z0-9._-]{1,128})/deployments/([A-Za-z0-9._-]{1,128}))",
             [this, find_run](const httplib::Request& req, httplib::Response& res) {
               if (!find_run(req.matches[2].str()).has_value()) {
                 return Fail(res, 404, "NOT_FOUND", "no deployment " + runtime::QuoteForMessage(req.matches[2].str()));
               }
               lathe::v1::HealthResponse health;
               front_end->Health(&health);
               Reply(res, {{"id", req.matches[2].str()},
                           {"status", health.state() == lathe::v1::HealthResponse::SERVING ? "ACTIVE" : "UNHEALTHY"}});
             });
  PostJson("/v1/loops/samplers", [this, find_run, base_model_of](auto& req, const json& body, auto& res) {
    if (!body.contains("run_id") || body.at("run_id").is_null()) {
      return Fail(res, 422, "UNIMPLEMENTED",
                  "only a run's paired sampler is served (send run_id); a standalone sampler of the base model "
                  "is the paired sampler of a run that has published nothing");
    }
    const std::string run = body.at("run_id").get<std::string>();
    std::optional<LoopsState::Trainer> t = find_run(run);
    if (!t.has_value()) return Fail(res, 422, "NOT_FOUND", "no Loops run " + runtime::QuoteForMessage(run));
    Reply(res, {{"sampler", RunJson(req, port, run, *t, base_model_of(req)).at("sampler")}});
  });

  // Checkpoints: ids are "<run>:<weights|sampler_weights>:<name>".
  auto checkpoint_json = [this](const httplib::Request& req, const lathe::v1::Checkpoint& c, const std::string& base) {
    const std::string run = RunOfPath(c.id());
    lathe::v1::GetInfoRequest info_request;
    info_request.set_run_id(run);
    lathe::v1::RunInfo info;
    (void)front_end->GetInfo(Authorization(req), info_request, &info);
    const bool sampler = absl::StrContains(c.id(), "/sampler_weights/");
    return json{{"id", CheckpointId(c.id())},
                {"run_id", run},
                {"checkpoint_id", c.id().substr(c.id().rfind('/') + 1)},
                {"checkpoint_path", BtPath(c.id())},
                {"checkpoint_type", "lora"},
                {"target", sampler ? "sampler" : "trainer"},
                {"created_at", Iso8601(absl::FromUnixMillis(c.created_unix_ms()))},
                {"base_model", base},
                {"lora_adapter_config", {{"r", info.lora().rank()}}},
                {"size_bytes", c.size_bytes()},
                {"sync_status", c.sync_state() == "committed" ? "COMPLETE" : "SYNCING"}};
  };
  server.Get("/v1/loops/checkpoints", [this, checkpoint_json, base_model_of](const httplib::Request& req,
                                                                            httplib::Response& res) {
    std::string run = req.get_param_value("run_id");
    std::string only;
    if (req.has_param("checkpoint_path")) {
      only = LatheFromBt(req.get_param_value("checkpoint_path"));
      if (only.empty()) {
        return Fail(res, 422, "INVALID_ARGUMENT", "checkpoint_path must be bt://loops:<run>/<kind>/<name>");
      }
      run = RunOfPath(only);
    }
    const std::string base = base_model_of(req);
    // base_model: every checkpoint of the deployment (it trains one model).
    const bool all = run.empty() && req.has_param("base_model");
    if (all && req.get_param_value("base_model") != base) return Reply(res, {{"checkpoints", json::array()}});
    if (run.empty() && !all) return Fail(res, 422, "INVALID_ARGUMENT", "give run_id, checkpoint_path or base_model");
    lathe::v1::ListCheckpointsRequest request;
    request.set_run_id(run);
    lathe::v1::ListCheckpointsResponse list;
    if (absl::Status s = front_end->ListCheckpoints(Authorization(req), request, &list); !s.ok()) return Fail(res, s);
    json out = json::array();
    for (const lathe::v1::Checkpoint& c : list.checkpoints()) {
      if (only.empty() || c.id() == only) out.push_back(checkpoint_json(req, c, base));
    }
    Reply(res, {{"checkpoints", std::move(out)}});
  });
  server.Post("/v1/loops/checkpoints/validate", [this](const httplib::Request& req, httplib::Response& res) {
    json body = json::parse(req.body, nullptr, false);
    const std::string path = body.is_object() ? LatheFromBt(body.value("checkpoint_path", "")) : "";
    lathe::v1::GetCheckpointFilesRequest probe;
    probe.set_checkpoint_id(path);
    probe.set_page_size(1);
    lathe::v1::GetCheckpointFilesResponse files;
    if (path.empty() || !front_end->GetCheckpointFiles(Authorization(req), probe, &files).ok()) {
      return Fail(res, 422, "NOT_FOUND", "no checkpoint " + runtime::QuoteForMessage(body.is_object() ? body.value("checkpoint_path", "") : ""));
    }
    Reply(res, {{"valid", true}});
  });
  const std::string checkpoint = R"(/v1/loops/checkpoints/([A-Za-z0-9._-]{1,128}:(?:weights|sampler_weights):[A-Za-z0-9._-]{1,128}))";
  // One page of files; page_token is the offset into the list, as Loops
  // counts it (lathe's own token is the offset too, as text).
  server.Get(checkpoint + "/files", [this](const httplib::Request& req, httplib::Response& res) {
    const std::string id = req.matches[1];
    int64_t size = 1000, offset = 0;
    if ((req.has_param("page_size") && (!absl::SimpleAtoi(req.get_param_value("page_size"), &size) || size < 1)) ||
        (req.has_param("page_token") && !req.get_param_value("page_token").empty() &&
         (!absl::SimpleAtoi(req.get_param_value("page_token"), &offset) || offset < 0))) {
      return Fail(res, 422, "INVALID_ARGUMENT", "page_size must be a positive integer and page_token a non-negative one");
    }
    lathe::v1::GetCheckpointFilesRequest request;
    request.set_checkpoint_id(PathOfId(id));
    request.set_page_size(static_cast<int32_t>(std::min<int64_t>(size, 1000)));
    if (offset > 0) request.set_page_token(std::to_string(offset));
    lathe::v1::GetCheckpointFilesResponse files;
    if (absl::Status s = front_end->GetCheckpointFiles(Authorization(req), request, &files); !s.ok()) {
      return Fail(res, s);
    }
    json urls = json::array();
    for (const lathe::v1::CheckpointFile& f : files.files()) {
      urls.push_back({{"url", absl::StrCat(Origin(req, port), "/v1/loops/checkpoints/", id, "/files/",
                                           f.relative_file_name())},
                      {"relative_file_name", f.relative_file_name()},
                      {"node_rank", f.node_rank()},
                      {"size_bytes", f.size_bytes()},
                      {"last_modified", Iso8601(absl::FromUnixMillis(f.last_modified_unix_ms()))}});
    }
    int64_t next = 0;
    Reply(res, {{"presigned_urls", std::move(urls)},
                {"next_page_token", absl::SimpleAtoi(files.next_page_token(), &next) ? json(next) : json(nullptr)},
                {"total_count", files.total_count()}});
  });
  server.Get(checkpoint + "/files/(.+)", [this](const httplib::Request& req, httplib::Response& res) {
    lathe::v1::DownloadCheckpointFileRequest request;
    request.set_checkpoint_id(PathOfId(req.matches[1].str()));
    request.set_relative_file_name(req.matches[2].str());
    const std::string auth = Authorization(req);
    // The key, the checkpoint and the file are checked before the status
    // line goes out (one chunk is read and dropped); then the file streams.
    absl::Status s = front_end->DownloadCheckpointFile(auth, request, [](const lathe::v1::FileChunk&) { return false; });
    if (!s.ok()) return Fail(res, s);
    coordinator::FrontEnd* fe = front_end;
    res.set_chunked_content_provider("application/octet-stream", [fe, auth, request](size_t, httplib::DataSink& sink) {
      absl::Status streamed = fe->DownloadCheckpointFile(auth, request, [&sink](const lathe::v1::FileChunk& c) {
        return sink.write(c.data().data(), c.data().size());
      });
      if (!streamed.ok()) return false;
      sink.done();
      return true;
    });
  });
  server.Delete(checkpoint, [this](const httplib::Request& req, httplib::Response& res) {
    lathe::v1::DeleteCheckpointRequest request;
    request.set_checkpoint_id(PathOfId(req.matches[1].str()));
    if (absl::Status s = front_end->DeleteCheckpoint(Authorization(req), request); !s.ok()) return Fail(res, s);
    Reply(res, {{"id", req.matches[1].str()}, {"deleted", true}});
  });
}

}  // namespace lathe::http
