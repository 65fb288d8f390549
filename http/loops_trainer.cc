// The Loops trainer routes (docs/http-api.md, "Trainer routes"): each op a
// lathe op of the URL's run at the ledger seq_id its Loops seq_id maps to,
// answered {"operation_id"}; results long-polled on GET /operations/{id}.
#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "http/door_impl.h"
#include "http/loops_convert.h"
#include "http/loops_door.h"
#include "http/tinker_convert.h"
#include "core/quote.h"

namespace lathe::http {
namespace {

using nlohmann::json;
using State = lathe::v1::RetrieveResponse;
using Fill = std::function<absl::Status(lathe::v1::SubmitRequest*)>;

constexpr size_t kInitKeysKept = 4096;

void Accepted(httplib::Response& res, const std::string& op_id) {
  res.status = 202;
  res.set_header("Location", "/operations/" + op_id);
  Reply(res, {{"operation_id", op_id}, {"schema_version", 1}});
}

std::string NoRun(const std::string& slot) {
  return slot == kLoopsLocal ? "no trainer yet: call init_trainer_server first"
                             : "no Loops run " + runtime::QuoteForMessage(slot) + " on this deployment";
}

// Records a submitted op: the trainer's last seq_id, and the run's
// publications (an `init` starts them afresh; `bump` publishes).
void Record(const LoopsDoor& door, const std::string& slot, const lathe::v1::SubmitRequest& op,
            const std::string& op_id, bool init, bool bump) {
  absl::MutexLock lock(&door.st->mu);
  LoopsState::Trainer& t = door.st->trainers[slot];
  if (t.run == op.run_id()) t.last = std::max(t.last, op.seq_id());
  LoopsState::Book& book = door.st->books[op.run_id()];
  if (init) {
    for (const std::string& id : book.published) door.st->versions.erase(id);
    book.published.clear();
  }
  if (bump && std::find(book.published.begin(), book.published.end(), op_id) == book.published.end()) {
    book.published.push_back(op_id);
  }
}

// Submits one ordered op of the URL's run at its Loops seq_id, filled by
// `fill`, and answers 202 {"operation_id"}.
void Submit(const LoopsDoor& door, const httplib::Request& req, const json& body, httplib::Response& res,
            bool init, bool bump, const Fill& fill) {
  const std::string slot = LoopsSlot(req);
  const int64_t seq = Number<int64_t>(body.at("seq_id"), "seq_id");
  if (seq < 1 || seq > (int64_t{1} << 62)) {
    return Fail(res, 422, "INVALID_ARGUMENT", absl::StrCat("seq_id ", seq, " is out of range"));
  }
  lathe::v1::SubmitRequest op;
  {
    absl::MutexLock lock(&door.st->mu);
    auto it = door.st->trainers.find(slot);
    if (it == door.st->trainers.end() || it->second.run.empty()) {
      return Fail(res, 422, "FAILED_PRECONDITION", NoRun(slot));
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
  if (s.ok()) s = door.front_end->Submit(Authorization(req), op, &response);
  if (s.ok()) {
    Record(door, slot, op, response.op_id(), init, bump);
    return Accepted(res, response.op_id());
  }
  lathe::v1::SubmitRequest noop;
  if (FillRefusedSeq(*door.front_end, Authorization(req), op, s, &noop)) Record(door, slot, noop, "", false, false);
  LoopsFail(door, res, s);
}

// Answers an init the slot saw before under the same Idempotency-Key; else false.
bool AnswerSeenInit(const LoopsDoor& door, const std::string& slot, const std::string& key, httplib::Response& res) {
  absl::MutexLock lock(&door.st->mu);
  auto it = door.st->inits.find(slot + " " + key);
  if (key.empty() || it == door.st->inits.end()) return false;
  Accepted(res, it->second);
  return true;
}

void AnswerInit(const LoopsDoor& door, const std::string& slot, const std::string& key, const std::string& op_id,
                httplib::Response& res) {
  absl::MutexLock lock(&door.st->mu);
  if (!key.empty()) {
    door.st->inits[slot + " " + key] = op_id;
    door.st->inits_order.push_back(slot + " " + key);
    if (door.st->inits_order.size() > kInitKeysKept) {
      door.st->inits.erase(door.st->inits_order.front());
      door.st->inits_order.pop_front();
    }
  }
  Accepted(res, op_id);
}

// Local mode's new client: the run the URL drove ends (a delete_run after
// its last op, so --max_runs holds; its checkpoints stay) and a fresh run
// starts, its creation being this init.
void InitLocal(const LoopsDoor& door, const httplib::Request& req, const json& body, httplib::Response& res,
               int32_t rank, const std::string& key) {
  const std::string auth = Authorization(req);
  LoopsState::Trainer old;
  {
    absl::MutexLock lock(&door.st->mu);
    old = door.st->trainers[kLoopsLocal];
  }
  if (!old.run.empty()) {
    lathe::v1::SubmitRequest end;
    end.set_run_id(old.run);
    end.set_seq_id(old.last + 1);
    end.mutable_delete_run();
    lathe::v1::SubmitResponse ended;
    if (door.front_end->Submit(auth, end, &ended).ok()) (void)AwaitOp(door, auth, ended.op_id(), absl::Minutes(2));
  }
  lathe::v1::CreateRunRequest create;
  create.set_base_model(body.value("base_model", ""));
  create.mutable_lora()->set_rank(rank);
  lathe::v1::CreateRunResponse created;
  if (absl::Status s = door.front_end->CreateRun(auth, create, &created); !s.ok()) return LoopsFail(door, res, s);
  {
    absl::MutexLock lock(&door.st->mu);
    if (!old.run.empty()) {
      for (const std::string& op_id : door.st->books[old.run].published) door.st->versions.erase(op_id);
      door.st->books.erase(old.run);
    }
    LoopsState::Trainer& now = door.st->trainers[kLoopsLocal];
    now = LoopsState::Trainer{};
    now.run = created.run_id();
    now.offset = -1;
    now.lora_rank = rank;
    now.created_op = created.init_op_id();
    now.created_at = absl::Now();
  }
  AnswerInit(door, kLoopsLocal, key, created.init_op_id(), res);
}

// A control-plane run's new client: the run's creation if nothing claimed
// it and the rank matches, else a re-init after every op given so far.
void InitRun(const LoopsDoor& door, const httplib::Request& req, httplib::Response& res, const std::string& run,
             int32_t rank, const std::string& key) {
  LoopsState::Trainer t;
  {
    absl::MutexLock lock(&door.st->mu);
    auto it = door.st->trainers.find(run);
    if (it == door.st->trainers.end()) return Fail(res, 422, "NOT_FOUND", NoRun(run));
    t = it->second;
    if (t.fresh && t.lora_rank == rank) {
      it->second.fresh = false;
      it->second.offset = -1;
    }
  }
  if (t.fresh && t.lora_rank == rank) return AnswerInit(door, run, key, t.created_op, res);
  lathe::v1::SubmitRequest op;
  op.set_run_id(run);
  op.set_seq_id(t.last + 1);
  op.mutable_init()->mutable_lora()->set_rank(rank);
  lathe::v1::SubmitResponse response;
  if (absl::Status s = door.front_end->Submit(Authorization(req), op, &response); !s.ok()) {
    return LoopsFail(door, res, s);
  }
  {
    absl::MutexLock lock(&door.st->mu);
    LoopsState::Trainer& now = door.st->trainers[run];
    now.fresh = false;
    now.offset = t.last;
  }
  Record(door, run, op, response.op_id(), true, false);
  AnswerInit(door, run, key, response.op_id(), res);
}

void InitTrainer(const LoopsDoor& door, const httplib::Request& req, const json& body, httplib::Response& res) {
  const int32_t rank = Number<int32_t>(body.at("lora_rank"), "lora_rank");
  // Later in a client's order: a re-init at its place.
  if (Number<int64_t>(body.at("seq_id"), "seq_id") != 1) {
    return Submit(door, req, body, res, true, false, [rank](lathe::v1::SubmitRequest* op) {
      op->mutable_init()->mutable_lora()->set_rank(rank);
      return absl::OkStatus();
    });
  }
  // seq_id 1: a new TrainingClient.
  const std::string slot = LoopsSlot(req);
  const std::string key = req.get_header_value("Idempotency-Key");
  absl::Mutex* init_mu = nullptr;
  {
    absl::MutexLock lock(&door.st->mu);
    if (slot != kLoopsLocal && door.st->trainers.count(slot) == 0) return Fail(res, 422, "NOT_FOUND", NoRun(slot));
    std::unique_ptr<absl::Mutex>& mu = door.st->init_mus[slot];
    if (mu == nullptr) mu = std::make_unique<absl::Mutex>();
    init_mu = mu.get();
  }
  absl::MutexLock init_lock(init_mu);
  if (AnswerSeenInit(door, slot, key, res)) return;
  if (slot == kLoopsLocal) return InitLocal(door, req, body, res, rank, key);
  InitRun(door, req, res, slot, rank, key);
}

// A finished op's result as Loops shapes it.
json ResultJson(const LoopsDoor& door, const std::string& auth, const State& view) {
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
      return {{"version", result.save_weights_for_sampler().step()},
              {"path", BtPath(result.save_weights_for_sampler().path())}};
    default:
      return json::object();
  }
}

// cpp-httplib decodes the path, so an id the SDK quoted (%2F) arrives with
// its slash.
void GetOperation(const LoopsDoor& door, const httplib::Request& req, httplib::Response& res) {
  const std::string auth = Authorization(req);
  lathe::v1::RetrieveRequest request;
  request.set_op_id(req.matches[2]);
  request.set_wait_ms(absl::ToInt64Milliseconds(door.poll_hold));
  State view;
  if (absl::Status s = door.front_end->Retrieve(auth, request, absl::InfiniteFuture(), &view); !s.ok()) {
    if (s.code() == absl::StatusCode::kNotFound || s.code() == absl::StatusCode::kInvalidArgument) {
      return Fail(res, 404, "NOT_FOUND", s.message());  // UnknownRequestError: resubmit
    }
    return LoopsFail(door, res, s);
  }
  if (view.state() == State::PENDING) {
    res.status = 408;  // re-polled at once
    return Reply(res, {{"status", "pending"}, {"operation_id", view.op_id()}});
  }
  if (view.state() == State::FAILED) {
    const bool user = view.error().category() == lathe::v1::OpError::USER;
    return Reply(res, {{"status", "error"},
                       {"error", runtime::TruncateMessage(view.error().message(), 4096)},
                       {"error_class", user ? "ValueError" : "ServerError"}});
  }
  Reply(res, {{"status", "done"}, {"result", ResultJson(door, auth, view)}});
}

void Health(const LoopsDoor& door, const httplib::Request& req, httplib::Response& res) {
  const std::string slot = LoopsSlot(req);
  {
    absl::MutexLock lock(&door.st->mu);
    if (slot != kLoopsLocal && door.st->trainers.count(slot) == 0) return Fail(res, 404, "NOT_FOUND", NoRun(slot));
  }
  lathe::v1::HealthResponse health;
  door.front_end->Health(&health);
  const bool serving = health.state() == lathe::v1::HealthResponse::SERVING;
  res.status = serving ? 200 : 503;
  Reply(res, {{"status", serving ? "ok" : "unavailable"}, {"detail", health.detail()}});
}

// Loops' policy version is the run's optimizer step.
void PolicyVersion(const LoopsDoor& door, const httplib::Request& req, httplib::Response& res) {
  const std::string run = LoopsRun(door, req);
  if (run.empty()) return Reply(res, {{"policy_version", 0}});
  lathe::v1::GetInfoRequest request;
  request.set_run_id(run);
  lathe::v1::RunInfo info;
  if (absl::Status s = door.front_end->GetInfo(Authorization(req), request, &info); !s.ok()) return Fail(res, s);
  Reply(res, {{"policy_version", info.step()}});
}

absl::Status LoadPath(const json& body, lathe::v1::LoadStateOp* load) {
  const std::string bt = body.at("path").get<std::string>();
  const std::string path = LatheFromBt(bt);
  if (path.empty()) {
    return absl::InvalidArgumentError("path must be bt://loops:<run>/weights/<name>, not " +
                                      runtime::QuoteForMessage(bt));
  }
  load->set_path(path);
  return absl::OkStatus();
}

int64_t Ttl(const json& body) {
  const bool set = body.contains("ttl_seconds") && !body.at("ttl_seconds").is_null();
  return set ? Number<int64_t>(body.at("ttl_seconds"), "ttl_seconds") : 0;
}

}  // namespace

void AddLoopsTrainerRoutes(const LoopsDoor& door) {
  const std::string t = kLoopsTrainer;
  door.post_json(t + "/init_trainer_server", [door](auto& req, auto& body, auto& res) {
    InitTrainer(door, req, body, res);
  });
  for (const bool forward_only : {false, true}) {
    door.post_json(t + (forward_only ? "/forward" : "/forward_backward"),
                   [door, forward_only](auto& req, const json& body, auto& res) {
                     Submit(door, req, body, res, false, false, [&](lathe::v1::SubmitRequest* op) {
                       return LoopsForwardBackwardFromJson(body, forward_only, op->run_id(), op->seq_id(), op);
                     });
                   });
  }
  door.post_json(t + "/optim_step", [door](auto& req, const json& body, auto& res) {
    Submit(door, req, body, res, false, false, [&](lathe::v1::SubmitRequest* op) {
      *op->mutable_optim_step() = AdamFromJson(body.value("adam_params", json::object()));
      return absl::OkStatus();
    });
  });
  door.post_json(t + "/save_state", [door](auto& req, const json& body, auto& res) {
    Submit(door, req, body, res, false, false, [&](lathe::v1::SubmitRequest* op) {
      op->mutable_save_state()->set_name(body.at("name").get<std::string>());
      op->mutable_save_state()->set_ttl_seconds(Ttl(body));
      return absl::OkStatus();
    });
  });
  door.post_json(t + "/load_state", [door](auto& req, const json& body, auto& res) {
    Submit(door, req, body, res, false, false,
           [&](lathe::v1::SubmitRequest* op) { return LoadPath(body, op->mutable_load_state()); });
  });
  door.post_json(t + "/load_state_with_optimizer", [door](auto& req, const json& body, auto& res) {
    Submit(door, req, body, res, false, false,
           [&](lathe::v1::SubmitRequest* op) { return LoadPath(body, op->mutable_load_state_with_optimizer()); });
  });
  door.post_json(t + "/save_weights_for_sampler", [door](auto& req, const json& body, auto& res) {
    Submit(door, req, body, res, false, body.value("bump_version", false), [&](lathe::v1::SubmitRequest* op) {
      op->mutable_save_weights_for_sampler()->set_name(body.at("name").get<std::string>());
      op->mutable_save_weights_for_sampler()->set_ttl_seconds(Ttl(body));
      return absl::OkStatus();
    });
  });
  door.server->Get(t + "/operations/(.+)", [door](auto& req, auto& res) { GetOperation(door, req, res); });
  door.server->Get(t + "/health", [door](auto& req, auto& res) { Health(door, req, res); });
  door.server->Get(t + "/policy_version", [door](auto& req, auto& res) { PolicyVersion(door, req, res); });
}

}  // namespace lathe::http
