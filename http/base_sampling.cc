// Sampling sessions of the base model alone (create_sampling_client with
// base_model): lathe samples the base model through a run (a sample op with
// `base`: the adapter off), and every LoRA run of the deployment holds the
// same base weights, so the session is bound to one.
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "http/door_impl.h"
#include "http/tinker_convert.h"
#include "core/quote.h"
#include "core/random_id.h"

namespace lathe::http {

using nlohmann::json;

namespace {

// An initialised LoRA run (its init reported the trainable parameters);
// the caller's session's own runs first.
std::optional<std::string> PickRun(const std::vector<lathe::v1::RunInfo>& runs, const std::string& session) {
  std::optional<std::string> any;
  for (const lathe::v1::RunInfo& run : runs) {
    if (run.lora().rank() < 1 || run.trainable_parameters() < 1) continue;
    if (!session.empty() && absl::StartsWith(run.run_id(), session + ":")) return run.run_id();
    if (!any.has_value()) any = run.run_id();
  }
  return any;
}

}  // namespace

void HttpDoor::Impl::CreateBaseSamplingSession(const httplib::Request& req, const json& body,
                                               httplib::Response& res) {
  lathe::v1::Capabilities caps;
  if (absl::Status s = front_end->GetCapabilities(Authorization(req), &caps); !s.ok()) return Fail(res, s);
  const json& named = body.contains("base_model") ? body.at("base_model") : json();
  const std::string base_model = named.is_null() ? "" : named.get<std::string>();
  if (base_model.empty() || caps.base_models_size() == 0 || base_model != caps.base_models(0)) {
    return Fail(res, 422, "INVALID_ARGUMENT",
                absl::StrCat("create_sampling_session needs model_path or base_model ",
                             caps.base_models_size() > 0 ? caps.base_models(0) : "",
                             " (the model this deployment serves), not ", runtime::QuoteForMessage(base_model)));
  }
  const json& session_id = body.contains("session_id") ? body.at("session_id") : json();
  const std::string session = session_id.is_null() ? "" : session_id.get<std::string>();
  const json& seq = body.contains("sampling_session_seq_id") ? body.at("sampling_session_seq_id") : json();
  const int64_t seq_id = seq.is_null() ? -1 : Number<int64_t>(seq, "sampling_session_seq_id");
  const std::string key = absl::StrCat("create ", session, " ", seq_id, " base");
  if (std::optional<std::string> id = samplers.IdOf(key); id.has_value()) {
    return Reply(res, {{"sampling_session_id", *id}});  // a retry
  }
  std::vector<lathe::v1::RunInfo> runs;
  if (absl::Status s = front_end->ListRuns(Authorization(req), &runs); !s.ok()) return Fail(res, s);
  std::optional<std::string> run = PickRun(runs, session);
  if (!run.has_value()) {
    // No run to sample through: one of the smallest adapter, named after the
    // session (a retry, or the session's next base session, finds it again).
    lathe::v1::CreateRunRequest create;
    create.set_run_id(absl::StrCat(session.empty() ? runtime::RandomId("session") : session, ":base"));
    create.mutable_lora()->set_rank(1);
    lathe::v1::CreateRunResponse created;
    if (absl::Status s = front_end->CreateRun(Authorization(req), create, &created); !s.ok()) return Fail(res, s);
    // Samples are not ordered after the run's initialisation: wait for it here.
    lathe::v1::RetrieveRequest wait;
    wait.set_op_id(created.init_op_id());
    wait.set_wait_ms(absl::ToInt64Milliseconds(options.poll_hold));
    lathe::v1::RetrieveResponse view;
    if (absl::Status s = front_end->Retrieve(Authorization(req), wait, absl::InfiniteFuture(), &view); !s.ok()) {
      return Fail(res, s);
    }
    if (view.state() == lathe::v1::RetrieveResponse::PENDING) {
      return Fail(res, 503, "UNAVAILABLE", "the run for base-model sampling is still initialising; retry");
    }
    if (view.state() == lathe::v1::RetrieveResponse::FAILED) {
      return Fail(res, 422, "FAILED_PRECONDITION",
                  absl::StrCat("the run for base-model sampling failed to initialise: ", view.error().message()));
    }
    run = created.run_id();
  }
  Reply(res, {{"sampling_session_id", samplers.Add(key, {*run, ""})}});
}

}  // namespace lathe::http
