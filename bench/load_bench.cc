// load_bench: many concurrent clients against a running deployment, each with
// its own run and its own connection, submitting a stream of operations and
// retrieving every result, with retries of the same seq_id (which must return
// the same op id) and conflicting payloads at a used seq_id (which must be
// refused with ALREADY_EXISTS). Checks that no result is lost, none is
// duplicated and no conflict is accepted: every op ends DONE with the result
// of its own kind, op ids are unique over all clients, and each run's
// optimizer step count at the end equals the optim_step ops it sent.
//
// Over gRPC (the default) the ops are noops with a forward_backward of one
// short datum and an optim_step at fixed periods. With --http_url the clients
// speak Tinker's REST API to the HTTP door instead (a session and a model
// each; the ops are optim_steps with a forward of the datum at a period, as
// the door has no noop); the step count is then read over gRPC.
//
// Prints one JSON line (ops/s, latency percentiles, violation counts); exits
// 1 when any check failed. tests/e2e/test_load.py and bench/load.py drive it.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "client/lathe_client.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "core/sft_data.h"

ABSL_FLAG(std::string, address, "127.0.0.1:7777", "coordinator host:port");
ABSL_FLAG(int, clients, 200, "concurrent clients, each with its own connection and run");
ABSL_FLAG(int, ops, 1000, "operations each client submits (after its run's init)");
ABSL_FLAG(int, retry_every, 7, "every N-th op is submitted twice (a retry of the same seq_id and request)");
ABSL_FLAG(int, conflict_every, 11, "every N-th op is followed by a conflicting request at its seq_id");
ABSL_FLAG(int, forward_backward_every, 25,
          "every N-th op is a forward_backward (over HTTP: a forward) of one short datum");
ABSL_FLAG(int, optim_every, 50, "every N-th op is an optim_step (the rest are noops; over HTTP all are optim_steps)");
ABSL_FLAG(std::string, http_url, "", "the HTTP door (http://host:port): the clients use Tinker's REST API");
ABSL_FLAG(std::string, api_key, "", "API key (gRPC: authorization header; HTTP door: X-API-Key)");
ABSL_FLAG(int64_t, vocab_size, 256, "vocabulary of the deployment's model, for the datum");
ABSL_FLAG(int, lora_rank, 4, "LoRA rank of each client's run");
ABSL_FLAG(double, op_timeout_s, 600, "how long one op may take before it counts as lost");
ABSL_FLAG(int, health_calls, 0,
          "baseline first: each client makes this many bare unary calls (Health) on its own connection");

namespace {

using lathe::client::Client;
using lathe::v1::OpResult;
using lathe::v1::SubmitRequest;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) { return std::chrono::duration<double>(Clock::now() - since).count(); }

struct Totals {
  std::mutex mu;
  std::vector<double> submit_s, round_trip_s;
  std::set<std::string> op_ids;
  int64_t ops = 0, retries = 0, conflicts = 0;
  // Violations.
  int64_t lost = 0, duplicated = 0, conflict_accepted = 0, wrong_result = 0, submit_failed = 0, step_mismatch = 0;
  std::vector<std::string> samples;  // the first few violations, for the log

  void Violation(int64_t& counter, const std::string& what) {
    std::lock_guard<std::mutex> lock(mu);
    ++counter;
    if (samples.size() < 10) samples.push_back(what);
  }
};

enum class Kind { kNoop, kForwardBackward, kOptimStep };

// The short datum every client trains on: its tokens, trained to predict the next.
struct Datum {
  std::vector<int64_t> tokens;
  lathe::v1::ForwardBackwardInput batch;  // the same datum as the gRPC message
};

// One client's view of the deployment: a run, and ops at seq_ids of it.
class Session {
 public:
  virtual ~Session() = default;
  // Creates the client's run; its first free seq_id.
  virtual absl::StatusOr<int64_t> Open(int index) = 0;
  virtual Kind KindOf(int i) const = 0;
  // Submits `kind` at `seq` (another kind than the op there when `conflict`).
  virtual absl::StatusOr<std::string> Submit(int64_t seq, Kind kind) = 0;
  // Waits for the op; InvalidArgument when its result is not of `kind`.
  virtual absl::Status Await(const std::string& op_id, Kind kind, absl::Duration timeout) = 0;
  virtual const std::string& run_id() const = 0;
};

int Every(const absl::Flag<int>& flag) { return absl::GetFlag(flag); }

class GrpcSession : public Session {
 public:
  GrpcSession(const Datum& datum, const lathe::client::ClientOptions& options)
      : datum_(datum), client_(Client::Connect(options)) {}

  absl::StatusOr<int64_t> Open(int index) override {
    lathe::v1::LoraConfig lora;
    lora.set_rank(absl::GetFlag(FLAGS_lora_rank));
    lora.set_seed(index);
    auto created = client_->CreateRun(lora, absl::Minutes(10));
    if (!created.ok()) return created.status();
    run_id_ = created->first.run_id();
    return created->first.next_seq_id();
  }

  Kind KindOf(int i) const override {
    if (i % Every(FLAGS_optim_every) == 0) return Kind::kOptimStep;
    if (i % Every(FLAGS_forward_backward_every) == 0) return Kind::kForwardBackward;
    return Kind::kNoop;
  }

  absl::StatusOr<std::string> Submit(int64_t seq, Kind kind) override {
    SubmitRequest request;
    request.set_run_id(run_id_);
    request.set_seq_id(seq);
    if (kind == Kind::kOptimStep) {
      request.mutable_optim_step()->set_learning_rate(1e-4);
    } else if (kind == Kind::kForwardBackward) {
      *request.mutable_forward_backward() = datum_.batch;
    } else {
      request.mutable_noop();
    }
    auto future = client_->Submit(request);
    if (!future.ok()) return future.status();
    return future->op_id();
  }

  absl::Status Await(const std::string& op_id, Kind kind, absl::Duration timeout) override {
    auto result = lathe::client::OpFuture(client_.get(), op_id).result(timeout);
    if (!result.ok()) return result.status();
    const bool matches = kind == Kind::kNoop              ? result->has_noop()
                         : kind == Kind::kForwardBackward ? result->has_forward_backward()
                                                          : result->has_optim_step();
    return matches ? absl::OkStatus() : absl::InvalidArgumentError("a result of another kind");
  }

  const std::string& run_id() const override { return run_id_; }

 private:
  const Datum& datum_;
  std::unique_ptr<Client> client_;
  std::string run_id_;
};

// Tinker's REST API through the HTTP door, as the SDK's JSON form sends it.
class HttpSession : public Session {
 public:
  HttpSession(const Datum& datum, const std::string& url, std::string base_model)
      : datum_(datum), http_(url), base_model_(std::move(base_model)) {
    http_.set_read_timeout(60);
    http_.set_connection_timeout(30);
    if (!absl::GetFlag(FLAGS_api_key).empty()) headers_.emplace("X-API-Key", absl::GetFlag(FLAGS_api_key));
  }

  absl::StatusOr<int64_t> Open(int index) override {
    auto session = Post("/api/v1/create_session", json::object());
    if (!session.ok()) return session.status();
    json create = {{"session_id", session->value("session_id", "")},
                   {"model_seq_id", 0},
                   {"base_model", base_model_},
                   {"lora_config", {{"rank", absl::GetFlag(FLAGS_lora_rank)}, {"seed", index}}}};
    auto future = Post("/api/v1/create_model", create);
    if (!future.ok()) return future.status();
    run_id_ = future->value("model_id", "");
    auto done = Retrieve(future->value("request_id", ""), absl::Minutes(10));
    if (!done.ok()) return done.status();
    return 1;
  }

  Kind KindOf(int i) const override {
    return i % Every(FLAGS_forward_backward_every) == 0 ? Kind::kForwardBackward : Kind::kOptimStep;
  }

  absl::StatusOr<std::string> Submit(int64_t seq, Kind kind) override {
    absl::StatusOr<json> future;
    if (kind == Kind::kForwardBackward) {
      const std::vector<int64_t>& t = datum_.tokens;
      const size_t n = t.size() - 1;
      json datum = {{"model_input", {{"chunks", {{{"type", "encoded_text"},
                                                  {"tokens", std::vector<int64_t>(t.begin(), t.end() - 1)}}}}}},
                    {"loss_fn_inputs",
                     {{"target_tokens", {{"data", std::vector<int64_t>(t.begin() + 1, t.end())},
                                         {"dtype", "int64"}, {"shape", {n}}}},
                      {"weights", {{"data", std::vector<double>(n, 1.0)}, {"dtype", "float32"}, {"shape", {n}}}}}}};
      future = Post("/api/v1/forward", {{"model_id", run_id_}, {"seq_id", seq},
                                        {"forward_input", {{"data", {datum}}, {"loss_fn", "cross_entropy"}}}});
    } else {
      future = Post("/api/v1/optim_step",
                    {{"model_id", run_id_}, {"seq_id", seq}, {"adam_params", {{"learning_rate", 1e-4}}}});
    }
    if (!future.ok()) return future.status();
    return future->value("request_id", "");
  }

  absl::Status Await(const std::string& op_id, Kind kind, absl::Duration timeout) override {
    auto result = Retrieve(op_id, timeout);
    if (!result.ok()) return result.status();
    const bool matches = result->contains("loss_fn_outputs") == (kind == Kind::kForwardBackward) &&
                         result->contains("metrics");
    return matches ? absl::OkStatus() : absl::InvalidArgumentError("a result of another kind: " + result->dump());
  }

  const std::string& run_id() const override { return run_id_; }

 private:
  // POSTs `body`; the JSON reply of a 200, else the error named by the reply's code.
  absl::StatusOr<json> Post(const std::string& path, const json& body) {
    httplib::Result res = http_.Post(path, headers_, body.dump(), "application/json");
    if (!res) return absl::UnavailableError(absl::StrCat(path, ": ", httplib::to_string(res.error())));
    json reply = json::parse(res->body, nullptr, /*allow_exceptions=*/false);
    if (res->status == 200 && !reply.is_discarded()) return reply;
    std::string code = reply.is_object() && reply.contains("error") && reply["error"].is_object()
                           ? reply["error"].value("code", "")
                           : "";
    const std::string what = absl::StrCat(path, ": HTTP ", res->status, " ", res->body.substr(0, 300));
    if (code == "ALREADY_EXISTS") return absl::AlreadyExistsError(what);
    return absl::UnknownError(what);
  }

  // Polls retrieve_future until the op is done: its result, or its error.
  absl::StatusOr<json> Retrieve(const std::string& request_id, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      auto reply = Post("/api/v1/retrieve_future", {{"request_id", request_id}});
      if (!reply.ok()) return reply.status();
      if (reply->value("type", "") == "try_again") continue;
      if (reply->contains("error")) return absl::InternalError(reply->dump());
      return reply;
    }
    return absl::DeadlineExceededError(absl::StrCat(request_id, " still pending"));
  }

  const Datum& datum_;
  httplib::Client http_;
  httplib::Headers headers_;
  std::string base_model_;
  std::string run_id_;
};

void RunClient(int index, Session& session, Client& steps, Totals& totals) {
  const std::string who = absl::StrCat("client ", index);
  auto first = session.Open(index);
  if (!first.ok()) return totals.Violation(totals.submit_failed, who + " create run: " + first.status().ToString());
  int64_t seq = *first;
  const absl::Duration timeout = absl::Seconds(absl::GetFlag(FLAGS_op_timeout_s));
  std::vector<double> submit_s, round_trip_s;
  std::vector<std::string> ids;
  int64_t optim_steps = 0, retries = 0, conflicts = 0;
  for (int i = 1; i <= absl::GetFlag(FLAGS_ops); ++i, ++seq) {
    const Kind kind = session.KindOf(i);
    if (kind == Kind::kOptimStep) ++optim_steps;
    const std::string at = absl::StrCat(who, " seq ", seq);
    const auto start = Clock::now();
    absl::StatusOr<std::string> id = session.Submit(seq, kind);
    if (!id.ok()) {
      totals.Violation(totals.submit_failed, at + ": " + id.status().ToString());
      continue;
    }
    submit_s.push_back(Seconds(start));
    if (i % Every(FLAGS_retry_every) == 0) {
      ++retries;
      absl::StatusOr<std::string> again = session.Submit(seq, kind);
      if (!again.ok() || *again != *id) {
        totals.Violation(totals.duplicated, at + ": a retry got " + (again.ok() ? "op " + *again : again.status().ToString()) +
                                                " instead of op " + *id);
      }
    }
    if (i % Every(FLAGS_conflict_every) == 0) {
      ++conflicts;
      const Kind other = kind == Kind::kOptimStep ? Kind::kForwardBackward : Kind::kOptimStep;
      absl::StatusOr<std::string> refused = session.Submit(seq, other);
      if (refused.ok() || refused.status().code() != absl::StatusCode::kAlreadyExists) {
        totals.Violation(totals.conflict_accepted, at + ": a conflicting request got " +
                                                       (refused.ok() ? "op " + *refused : refused.status().ToString()));
      }
    }
    if (absl::Status done = session.Await(*id, kind, timeout); !done.ok()) {
      totals.Violation(done.code() == absl::StatusCode::kInvalidArgument ? totals.wrong_result : totals.lost,
                       at + ": " + done.ToString());
      continue;
    }
    round_trip_s.push_back(Seconds(start));
    ids.push_back(*id);
  }
  auto info = steps.GetInfo(session.run_id());
  if (!info.ok() || info->step() != optim_steps) {
    totals.Violation(totals.step_mismatch, who + ": the run took " +
                                               (info.ok() ? absl::StrCat(info->step()) : info.status().ToString()) +
                                               " optimizer steps for " + absl::StrCat(optim_steps) + " optim_step ops");
  }
  std::lock_guard<std::mutex> lock(totals.mu);
  for (const std::string& id : ids) {
    if (!totals.op_ids.insert(id).second) {
      ++totals.duplicated;
      if (totals.samples.size() < 10) totals.samples.push_back("op id " + id + " given twice");
    }
  }
  totals.ops += static_cast<int64_t>(ids.size());
  totals.retries += retries;
  totals.conflicts += conflicts;
  totals.submit_s.insert(totals.submit_s.end(), submit_s.begin(), submit_s.end());
  totals.round_trip_s.insert(totals.round_trip_s.end(), round_trip_s.begin(), round_trip_s.end());
}

double PercentileMs(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))] * 1e3;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  for (int n : {absl::GetFlag(FLAGS_clients), absl::GetFlag(FLAGS_ops), absl::GetFlag(FLAGS_retry_every),
                absl::GetFlag(FLAGS_conflict_every), absl::GetFlag(FLAGS_forward_backward_every),
                absl::GetFlag(FLAGS_optim_every)}) {
    if (n <= 0) {
      std::fprintf(stderr, "load_bench: every count and period must be positive\n");
      return 2;
    }
  }
  // One short datum, the same for every client, read as the SFT data format.
  Datum datum;
  for (int64_t i = 0; i < 17; ++i) datum.tokens.push_back((3 + 5 * i) % absl::GetFlag(FLAGS_vocab_size));
  const std::string data = (std::filesystem::temp_directory_path() /
                            absl::StrCat("lathe-load-bench-", getpid(), ".jsonl")).string();
  { std::ofstream(data) << json{{"tokens", datum.tokens}}.dump() << "\n"; }
  auto datums = lathe::runtime::ReadSftJsonl(data);
  std::filesystem::remove(data);
  if (!datums.ok()) {
    std::fprintf(stderr, "load_bench: %s\n", datums.status().ToString().c_str());
    return 2;
  }
  datum.batch.set_loss_fn("cross_entropy");
  *datum.batch.add_data() = datums->front();
  lathe::client::ClientOptions options;
  options.address = absl::GetFlag(FLAGS_address);
  options.api_key = absl::GetFlag(FLAGS_api_key);
  std::unique_ptr<Client> admin = Client::Connect(options);  // waits for serving; reads the step counts
  if (absl::Status s = admin->WaitServing(absl::Seconds(120)); !s.ok()) {
    std::fprintf(stderr, "load_bench: %s\n", s.ToString().c_str());
    return 2;
  }
  const std::string http_url = absl::GetFlag(FLAGS_http_url);
  std::string base_model;
  if (!http_url.empty()) {
    auto caps = admin->GetCapabilities();
    if (!caps.ok() || caps->base_models().empty()) {
      std::fprintf(stderr, "load_bench: no base model from GetCapabilities\n");
      return 2;
    }
    base_model = caps->base_models(0);
  }
  // The baseline: the same clients making bare unary calls, as fast as they can.
  double health_per_s = 0;
  if (const int calls = absl::GetFlag(FLAGS_health_calls); calls > 0) {
    std::atomic<int64_t> failed{0};
    const auto begin = Clock::now();
    std::vector<std::thread> callers;
    for (int i = 0; i < absl::GetFlag(FLAGS_clients); ++i) {
      callers.emplace_back([calls, &options, &failed] {
        std::unique_ptr<Client> client = Client::Connect(options);
        for (int c = 0; c < calls; ++c) failed += client->Health().ok() ? 0 : 1;
      });
    }
    for (std::thread& t : callers) t.join();
    health_per_s = static_cast<double>(calls) * absl::GetFlag(FLAGS_clients) / Seconds(begin);
    if (failed > 0) std::fprintf(stderr, "load_bench: %lld Health calls failed\n", static_cast<long long>(failed.load()));
  }
  Totals totals;
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int i = 0; i < absl::GetFlag(FLAGS_clients); ++i) {
    threads.emplace_back([&, i] {
      std::unique_ptr<Session> session;
      if (http_url.empty()) {
        session = std::make_unique<GrpcSession>(datum, options);
      } else {
        session = std::make_unique<HttpSession>(datum, http_url, base_model);
      }
      RunClient(i, *session, *admin, totals);
    });
  }
  for (std::thread& t : threads) t.join();
  const double seconds = Seconds(start);
  for (const std::string& s : totals.samples) std::fprintf(stderr, "load_bench: %s\n", s.c_str());
  const int64_t violations = totals.lost + totals.duplicated + totals.conflict_accepted + totals.wrong_result +
                             totals.submit_failed + totals.step_mismatch;
  std::printf(
      "{\"clients\": %d, \"ops\": %lld, \"retries\": %lld, \"conflicts\": %lld, \"seconds\": %.3f, "
      "\"ops_per_s\": %.1f, \"health_calls_per_s\": %.1f, \"submit_p50_ms\": %.3f, \"submit_p99_ms\": %.3f, \"round_trip_p50_ms\": %.3f, "
      "\"round_trip_p99_ms\": %.3f, \"lost\": %lld, \"duplicated\": %lld, \"conflict_accepted\": %lld, "
      "\"wrong_result\": %lld, \"submit_failed\": %lld, \"step_mismatch\": %lld}\n",
      absl::GetFlag(FLAGS_clients), static_cast<long long>(totals.ops), static_cast<long long>(totals.retries),
      static_cast<long long>(totals.conflicts), seconds, static_cast<double>(totals.ops) / seconds, health_per_s,
      PercentileMs(totals.submit_s, 0.5), PercentileMs(totals.submit_s, 0.99), PercentileMs(totals.round_trip_s, 0.5),
      PercentileMs(totals.round_trip_s, 0.99), static_cast<long long>(totals.lost),
      static_cast<long long>(totals.duplicated), static_cast<long long>(totals.conflict_accepted),
      static_cast<long long>(totals.wrong_result), static_cast<long long>(totals.submit_failed),
      static_cast<long long>(totals.step_mismatch));
  return violations == 0 ? 0 : 1;
}
