// Loops wire bodies <-> lathe.v1. The Loops bodies are close to Tinker's JSON
// ones, so most of this reshapes them and reuses tinker_convert's checked
// readers.
#include "http/loops_convert.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "http/tinker_convert.h"

namespace lathe::http {
namespace {

using nlohmann::json;

bool Has(const json& body, const char* key) { return body.contains(key) && !body.at(key).is_null(); }

template <class T>
std::vector<T> Unpack(const std::string& bytes) {
  std::vector<T> out(bytes.size() / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
  return out;
}

json Float(float v) { return std::isfinite(v) ? json(v) : json(nullptr); }

constexpr absl::string_view kBt = "bt://loops:";

}  // namespace

std::string BtPath(absl::string_view lathe_path) {
  if (absl::ConsumePrefix(&lathe_path, "lathe://")) return absl::StrCat(kBt, lathe_path);
  return std::string(lathe_path);
}

std::string LatheFromBt(absl::string_view bt_path) {
  if (!absl::ConsumePrefix(&bt_path, kBt)) return "";
  return absl::StrCat("lathe://", bt_path);
}

absl::Status LoopsForwardBackwardFromJson(const json& body, bool forward_only, const std::string& run_id,
                                          int64_t seq_id, lathe::v1::SubmitRequest* op) {
  // Tinker's JSON form carries the same datum shape one level down.
  json input = {{"data", body.at("data")}, {"loss_fn", body.value("loss_fn", "cross_entropy")}};
  if (Has(body, "loss_fn_config")) input["loss_fn_config"] = body.at("loss_fn_config");
  if (Has(body, "top_k_logprobs") && Number<int64_t>(body.at("top_k_logprobs"), "top_k_logprobs") != 0) {
    return absl::InvalidArgumentError("top_k_logprobs is not supported (send 0)");
  }
  for (const json& datum : body.at("data")) {
    if (Has(datum, "routed_experts_ref")) return absl::InvalidArgumentError("routed_experts_ref is not supported");
  }
  return ForwardBackwardFromJson({{"model_id", run_id}, {"seq_id", seq_id}, {"forward_backward_input", input}},
                                 forward_only, op);
}

json LoopsForwardBackwardOutput(const lathe::v1::ForwardBackwardOutput& output) {
  json out = ForwardBackwardOutputToJson(output);
  // Loops' loss is one number: lathe's summed loss per loss token.
  double loss = 0;
  if (auto it = output.metrics().find("loss:sum"); it != output.metrics().end()) loss = it->second;
  if (auto it = output.metrics().find("num_loss_tokens:sum"); it != output.metrics().end() && it->second > 0) {
    loss /= it->second;
  }
  out["loss"] = std::isfinite(loss) ? json(loss) : json(nullptr);
  return out;
}

absl::Status LoopsSampleFromJson(const json& body, lathe::v1::SampleOp* op) {
  if (Has(body, "model_input_chunks") && !body.at("model_input_chunks").empty()) {
    return absl::InvalidArgumentError("model_input_chunks (image prompts) are not supported; send prompt token ids");
  }
  if (Has(body, "structured_outputs")) return absl::InvalidArgumentError("structured_outputs are not supported");
  if (body.value("include_routed_experts", false)) {
    return absl::InvalidArgumentError("include_routed_experts is not supported");
  }
  if (Has(body, "logprobs") && Number<int64_t>(body.at("logprobs"), "logprobs") != 0) {
    return absl::InvalidArgumentError("logprobs above 0 (top-k sampled logprobs) are not supported");
  }
  json params = json::object();
  for (const char* key : {"max_tokens", "seed", "temperature", "top_p"}) {
    if (Has(body, key)) params[key] = body.at(key);
  }
  if (Has(body, "top_k") && Number<int64_t>(body.at("top_k"), "top_k") > 0) params["top_k"] = body.at("top_k");
  if (Has(body, "stop")) {
    const json& stop = body.at("stop");
    if (stop.is_string() || (stop.is_array() && !stop.empty())) {
      return absl::InvalidArgumentError(
          "stop strings are not supported (lathe has no tokenizer); send stop_token_ids instead");
    }
  }
  if (Has(body, "stop_token_ids")) params["stop"] = body.at("stop_token_ids");
  json tinker = {{"prompt", {{"chunks", json::array({{{"tokens", body.at("prompt")}}})}}},
                 {"num_samples", Has(body, "n") ? body.at("n") : json(1)},
                 {"sampling_params", std::move(params)}};
  if (Has(body, "prompt_logprobs")) {
    const int32_t k = Number<int32_t>(body.at("prompt_logprobs"), "prompt_logprobs");
    if (k < 0) return absl::InvalidArgumentError("prompt_logprobs must not be negative");
    tinker["prompt_logprobs"] = true;
    if (k > 0) tinker["topk_prompt_logprobs"] = k;
  }
  return SampleFromJson(tinker, "", op);
}

json LoopsCompletion(const lathe::v1::SampleOp& op, const lathe::v1::SampleResult& result, const std::string& model) {
  std::vector<int32_t> prompt;
  for (const lathe::v1::ModelInputChunk& chunk : op.prompt().chunks()) {
    std::vector<int32_t> tokens = Unpack<int32_t>(chunk.encoded_text().tokens());
    prompt.insert(prompt.end(), tokens.begin(), tokens.end());
  }
  // One entry per prompt position: null at 0, else {"<id>": {logprob, rank?}}
  // holding the actual token and, with top-k, the k likeliest.
  json prompt_logprobs;
  if (op.include_prompt_logprobs()) {
    prompt_logprobs = json::array();
    const std::vector<float> actual = Unpack<float>(result.prompt_logprobs());
    const lathe::v1::TopkPromptLogprobs& topk = result.topk_prompt_logprobs();
    const std::vector<int32_t> top_ids = Unpack<int32_t>(topk.token_ids());
    const std::vector<float> top_lps = Unpack<float>(topk.logprobs());
    for (size_t i = 0; i < prompt.size(); ++i) {
      if (i == 0) {
        prompt_logprobs.push_back(nullptr);
        continue;
      }
      json entry = json::object();
      const size_t k = topk.k();
      for (size_t j = 0; j < k && i * k + j < top_ids.size(); ++j) {
        entry[std::to_string(top_ids[i * k + j])] = {{"logprob", Float(top_lps[i * k + j])},
                                                     {"rank", static_cast<int64_t>(j + 1)}};
      }
      entry[std::to_string(prompt[i])] = {{"logprob", i < actual.size() ? Float(actual[i]) : json(nullptr)}};
      prompt_logprobs.push_back(std::move(entry));
    }
  }
  json choices = json::array();
  int index = 0;
  for (const lathe::v1::SampledSequence& seq : result.sequences()) {
    const std::vector<int32_t> tokens = Unpack<int32_t>(seq.tokens());
    json token_logprobs = json::array();
    for (float lp : Unpack<float>(seq.logprobs())) token_logprobs.push_back(Float(lp));
    json names = json::array();
    for (int32_t t : tokens) names.push_back(absl::StrCat("token_id:", t));
    json choice = {{"index", index++},
                   {"text", ""},
                   {"token_ids", tokens},
                   {"logprobs", {{"token_logprobs", std::move(token_logprobs)}, {"tokens", std::move(names)}}},
                   {"finish_reason", seq.stop_reason() == lathe::v1::STOP ? "stop" : "length"},
                   {"prompt_token_ids", prompt}};
    if (op.include_prompt_logprobs()) choice["prompt_logprobs"] = prompt_logprobs;
    choices.push_back(std::move(choice));
  }
  return {{"object", "text_completion"}, {"model", model}, {"choices", std::move(choices)}};
}

}  // namespace lathe::http
