// Translation between Tinker's wire bodies (JSON, and the protobuf of
// forward / forward_backward) and lathe.v1 messages. Pure functions, no I/O.
#ifndef LATHE_HTTP_TINKER_CONVERT_H_
#define LATHE_HTTP_TINKER_CONVERT_H_

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "lathe/v1/service.pb.h"
#include "tinker_wire.pb.h"

namespace lathe::http {

// `value` as T, checked: an integer T needs a JSON integer within T's range
// (a float, a negative for an unsigned T, or a value past the range is not
// wrapped or cast); a floating T takes any JSON number (beyond float32 it
// becomes ±inf, which lathe's validation then refuses). Throws
// nlohmann::json::type_error naming `what` otherwise, which the door answers
// with 422.
template <typename T>
T Number(const nlohmann::json& value, const char* what) {
  auto refuse = [&](const char* why) {
    return nlohmann::json::type_error::create(302, std::string(what) + " " + why, &value);
  };
  if constexpr (std::is_floating_point_v<T>) {
    if (!value.is_number()) throw refuse("must be a number");
    const double d = value.get<double>();
    if (std::fabs(d) > std::numeric_limits<T>::max()) return d > 0 ? INFINITY : -INFINITY;
    return static_cast<T>(d);
  } else {
    if (value.is_number_unsigned()) {
      if (value.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<T>::max())) throw refuse("is too large");
      return static_cast<T>(value.get<uint64_t>());
    }
    if (!value.is_number_integer()) throw refuse("must be an integer");
    const int64_t i = value.get<int64_t>();
    if ((std::is_unsigned_v<T> && i < 0) ||
        (!std::is_unsigned_v<T> && (i < static_cast<int64_t>(std::numeric_limits<T>::min()) ||
                                    i > static_cast<int64_t>(std::numeric_limits<T>::max())))) {
      throw refuse("is out of range");
    }
    return static_cast<T>(i);
  }
}

// The string at `key` of a JSON object; a missing key or another type is
// thrown as a json::exception naming `key` (answered 422).
inline std::string String(const nlohmann::json& object, const char* key) {
  if (!object.contains(key)) throw nlohmann::json::out_of_range::create(403, std::string(key) + " is missing", &object);
  const nlohmann::json& value = object.at(key);
  if (!value.is_string()) {
    throw nlohmann::json::type_error::create(302, std::string(key) + " must be a string, not " + value.type_name(),
                                             &value);
  }
  return value.get<std::string>();
}

// Deepest nesting ParseJsonBody accepts (Tinker and Loops bodies nest under
// ten deep).
inline constexpr int kMaxJsonBodyDepth = 64;

// A request body parsed as JSON, nested at most kMaxJsonBodyDepth deep: a
// deeper body is refused while it is parsed, before any code copies or walks
// it recursively (which a body of 64 MiB of '[' would take past the stack).
// Throws nlohmann::json::exception (answered 422) for text that is not JSON
// or nests too deep.
nlohmann::json ParseJsonBody(const std::string& body);

// A Tinker ForwardBackwardRequest (protobuf) as a lathe forward or
// forward_backward op. InvalidArgument for what lathe cannot run as sent:
// image or dmel chunks, sparse tensors, provenance spans, text-valued loss
// config, a dtype lathe does not read.
absl::Status ForwardBackwardFromProto(const tinker::ForwardBackwardRequest& request,
                                      lathe::v1::SubmitRequest* op);
// The JSON form ({model_id, seq_id, forward_backward_input: {data, loss_fn,
// loss_fn_config}}; /api/v1/forward's says forward_input) sent by SDKs
// before 0.25 and by hand. Throws
// nlohmann::json::exception for a body of the wrong shape; InvalidArgument
// as above.
absl::Status ForwardBackwardFromJson(const nlohmann::json& body, bool forward_only, lathe::v1::SubmitRequest* op);
// A lathe forward / forward_backward result as Tinker's protobuf
// ForwardBackwardOutput (one ArrayRecord per datum), serialized.
std::string ForwardBackwardOutputToProto(const lathe::v1::ForwardBackwardOutput& output);
// The same as Tinker's JSON ForwardBackwardOutput (NaN as null).
nlohmann::json ForwardBackwardOutputToJson(const lathe::v1::ForwardBackwardOutput& output);
// Tinker's SampleRequest JSON (prompt, num_samples, sampling_params,
// prompt_logprobs, topk_prompt_logprobs) as a lathe SampleOp reading
// `model_path`. Throws nlohmann::json::exception for a body of the wrong
// shape; InvalidArgument for what lathe cannot run: image chunks, string
// stop sequences (lathe has no tokenizer), topk_sample_logprobs,
// prompt_alt_tokens_k, target_prompt_logprobs, prompt_logprobs_last_n,
// record_stability_info. Values are checked by lathe's own validation.
absl::Status SampleFromJson(const nlohmann::json& body, const std::string& model_path, lathe::v1::SampleOp* op);
// A lathe SampleResult as Tinker's protobuf SampleResponse, serialized.
std::string SampleResponseToProto(const lathe::v1::SampleResult& result);
// Tinker's adam_params object; absent keys keep lathe's defaults. Throws
// nlohmann::json::exception for a value that is not a number.
lathe::v1::AdamParams AdamFromJson(const nlohmann::json& adam);
// Tinker's lora_config object. Throws as above.
lathe::v1::LoraConfig LoraFromJson(const nlohmann::json& lora);

}  // namespace lathe::http

#endif  // LATHE_HTTP_TINKER_CONVERT_H_
