// The HTTP door's sampling routes: sampling sessions (create_sampling_session,
// samplers/{id}, the ephemeral save_weights_for_sampler) and asample, which
// runs lathe's sample op pinned to the session's weights.
#include <limits>
#include <optional>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "http/door_impl.h"
#include "http/tinker_convert.h"
#include "core/checkpoint_path.h"
#include "core/quote.h"

namespace lathe::http {

using nlohmann::json;

void HttpDoor::Impl::SaveWeightsForSampler(const httplib::Request& req, const json& body, httplib::Response& res) {
  lathe::v1::SubmitRequest op;
  op.set_run_id(String(body, "model_id"));
  op.set_seq_id(Number<int64_t>(body.at("seq_id"), "seq_id"));
  lathe::v1::SaveWeightsForSamplerOp* save = op.mutable_save_weights_for_sampler();
  const bool ephemeral = !body.contains("path") || body.at("path").is_null();
  // save_weights_and_get_sampling_client names no checkpoint: it gets one
  // named by its seq_id, so a retry is the same operation.
  save->set_name(ephemeral ? absl::StrCat("ephemeral-", op.seq_id()) : String(body, "path"));
  if (body.contains("ttl_seconds") && !body.at("ttl_seconds").is_null()) {
    save->set_ttl_seconds(Number<int64_t>(body.at("ttl_seconds"), "ttl_seconds"));
  }
  lathe::v1::SubmitResponse response;
  if (absl::Status s = front_end->Submit(Authorization(req), op, &response); !s.ok()) {
    return Refuse(req, op, s, res);  // a name refused: the run's order goes on
  }
  if (ephemeral) {
    samplers.Add("save " + response.op_id(),
                 {op.run_id(), absl::StrCat("lathe://", op.run_id(), "/sampler_weights/", save->name())});
  }
  Reply(res, {{"request_id", response.op_id()}, {"model_id", op.run_id()}});
}

void HttpDoor::Impl::CreateSamplingSession(const httplib::Request& req, const json& body, httplib::Response& res) {
  if (!body.contains("model_path") || body.at("model_path").is_null()) return CreateBaseSamplingSession(req, body, res);
  const std::string tinker_path = String(body, "model_path");
  const std::string path = LathePath(tinker_path);
  absl::StatusOr<runtime::CheckpointRef> ref = runtime::ParseCheckpointPath(path, /*allow_sampler=*/true);
  if (!absl::StartsWith(tinker_path, "tinker://") || !ref.ok() || ref->kind != "sampler_weights") {
    return Fail(res, 422, "INVALID_ARGUMENT",
                absl::StrCat("model_path must be tinker://<run>/sampler_weights/<name>, not ",
                             runtime::QuoteForMessage(tinker_path),
                             ref.ok() ? "" : absl::StrCat(" (", ref.status().message(), ")")));
  }
  if (body.value("session_id", "").size() > 128) {
    return Fail(res, 422, "INVALID_ARGUMENT", "session_id is longer than 128 bytes");
  }
  // Checked against the checkpoints when it is first sampled (the front end's rule for model_path).
  const json& seq = body.contains("sampling_session_seq_id") ? body.at("sampling_session_seq_id") : json();
  const int64_t seq_id = seq.is_null() ? -1 : Number<int64_t>(seq, "sampling_session_seq_id");
  const std::string key = absl::StrCat("create ", body.value("session_id", ""), " ", seq_id, " ", path);
  Reply(res, {{"sampling_session_id", samplers.Add(key, {RunOfPath(path), path})}});
}

void HttpDoor::Impl::GetSampler(const httplib::Request& req, httplib::Response& res) {
  const std::string id(absl::StripPrefix(req.path, "/api/v1/samplers/"));
  std::optional<SamplingSession> sampler = samplers.Find(id);
  if (!sampler.has_value()) {
    return Fail(res, 404, "NOT_FOUND", "no sampling session " + runtime::QuoteForMessage(id));
  }
  lathe::v1::Capabilities caps;
  if (absl::Status s = front_end->GetCapabilities(Authorization(req), &caps); !s.ok()) return Fail(res, s);
  json reply = {{"sampler_id", id}, {"base_model", caps.base_models_size() > 0 ? caps.base_models(0) : ""}};
  if (!sampler->lathe_path.empty()) reply["model_path"] = TinkerPath(sampler->lathe_path);
  Reply(res, reply);
}

void HttpDoor::Impl::ASample(const httplib::Request& req, const json& body, httplib::Response& res) {
  const std::string id = String(body, "sampling_session_id");
  std::optional<SamplingSession> sampler = samplers.Find(id);
  if (!sampler.has_value()) {
    return Fail(res, 404, "NOT_FOUND", "no sampling session " + runtime::QuoteForMessage(id) +
                                           " (forgotten, or made by another coordinator)");
  }
  lathe::v1::SubmitRequest op;
  op.set_run_id(sampler->run_id);
  // The SDK counts a sampling client's requests from 0; the ledger from 1.
  const int64_t seq_id = Number<int64_t>(body.at("seq_id"), "seq_id");
  if (seq_id < 0 || seq_id == std::numeric_limits<int64_t>::max()) {
    return Fail(res, 422, "INVALID_ARGUMENT", absl::StrCat("seq_id ", seq_id, " is out of range"));
  }
  op.set_seq_id(seq_id + 1);
  if (absl::Status s = SampleFromJson(body, sampler->lathe_path, op.mutable_sample()); !s.ok()) return Fail(res, s);
  op.mutable_sample()->set_base(sampler->lathe_path.empty());  // a base-model session
  lathe::v1::SubmitResponse response;
  if (absl::Status s = front_end->SubmitSampling(Authorization(req), op, id, &response); !s.ok()) {
    return Fail(res, s);
  }
  json sequence_ids = json::array();
  for (int i = 0; i < op.sample().num_samples(); ++i) sequence_ids.push_back(absl::StrCat(response.op_id(), "/", i));
  Reply(res, {{"request_id", response.op_id()},
              {"model_id", op.run_id()},
              {"sample_sequence_ids", std::move(sequence_ids)}});
}

}  // namespace lathe::http
