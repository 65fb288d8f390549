// Tinker wire bodies <-> lathe.v1: tokens and tensors travel as packed
// little-endian bytes on both sides, so most of this is copying.
#include "http/tinker_convert.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "core/quote.h"

namespace lathe::http {
namespace {

using nlohmann::json;

template <class T>
void Append(std::string* bytes, T value) {
  char raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  bytes->append(raw, sizeof(T));
}

template <class T>
T Read(const std::string& bytes, size_t i) {
  T value;
  std::memcpy(&value, bytes.data() + i * sizeof(T), sizeof(T));
  return value;
}

absl::Status TensorFromProto(const std::string& name, const tinker::Tensor& in, lathe::v1::TensorData* out) {
  if (in.has_sparse_csr()) {
    return absl::InvalidArgumentError(absl::StrCat("loss_fn_inputs ", runtime::QuoteForMessage(name),
                                                   ": sparse tensors are not supported yet; send it dense"));
  }
  if (in.dtype() < tinker::DTYPE_FLOAT32 || in.dtype() > tinker::DTYPE_BFLOAT16) {
    return absl::InvalidArgumentError(
        absl::StrCat("loss_fn_inputs ", runtime::QuoteForMessage(name), ": unknown dtype ", in.dtype()));
  }
  // The two enums share their numbers (FLOAT32 1, INT64 2, INT32 3, BFLOAT16 4).
  out->set_dtype(static_cast<lathe::v1::DType>(in.dtype()));
  out->mutable_shape()->Add(in.shape().begin(), in.shape().end());
  out->set_data(in.dense());
  return absl::OkStatus();
}

absl::Status DatumFromProto(const tinker::Datum& in, lathe::v1::Datum* out) {
  if (in.model_input_spans_size() > 0 || in.loss_fn_input_spans_size() > 0) {
    return absl::InvalidArgumentError("provenance spans (stable_reinforce) are not supported");
  }
  for (const tinker::Chunk& chunk : in.model_input()) {
    if (!chunk.has_encoded_text()) {
      return absl::InvalidArgumentError("only encoded_text chunks are supported (no image or dmel input)");
    }
    out->mutable_model_input()->add_chunks()->mutable_encoded_text()->set_tokens(chunk.encoded_text().tokens());
  }
  for (const auto& [name, tensor] : in.loss_fn_inputs()) {
    lathe::v1::TensorData converted;
    if (absl::Status s = TensorFromProto(name, tensor, &converted); !s.ok()) return s;
    (*out->mutable_loss_fn_inputs())[name] = std::move(converted);
  }
  return absl::OkStatus();
}

lathe::v1::ForwardBackwardInput* OpInput(bool forward_only, lathe::v1::SubmitRequest* op) {
  return forward_only ? op->mutable_forward() : op->mutable_forward_backward();
}

// JSON token ids as packed int32. Read wide and checked, so an id past
// int32 cannot wrap into the vocabulary.
absl::Status TokensFromJson(const json& ids, std::string* tokens) {
  for (const json& t : ids) {
    const int64_t id = Number<int64_t>(t, "a token id");
    if (id < std::numeric_limits<int32_t>::min() || id > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is not an int32"));
    }
    Append<int32_t>(tokens, static_cast<int32_t>(id));
  }
  return absl::OkStatus();
}

// A set, non-null key of `body`.
bool Has(const json& body, const char* key) { return body.contains(key) && !body.at(key).is_null(); }

// Tinker's sampling_params; absent keys keep lathe's defaults.
absl::Status ParamsFromJson(const json& in, lathe::v1::SamplingParams* out) {
  if (Has(in, "max_tokens")) out->set_max_tokens(Number<int32_t>(in.at("max_tokens"), "max_tokens"));
  if (Has(in, "seed")) out->set_seed(Number<uint64_t>(in.at("seed"), "seed"));
  // null temperature / top_p is how the SDK serialises NaN and infinity (both have defaults, never None).
  if (in.contains("temperature")) out->set_temperature(Number<float>(in.at("temperature"), "temperature"));
  if (Has(in, "top_k")) out->set_top_k(Number<int32_t>(in.at("top_k"), "top_k"));
  if (in.contains("top_p")) out->set_top_p(Number<float>(in.at("top_p"), "top_p"));
  if (!Has(in, "stop")) return absl::OkStatus();
  const json& stop = in.at("stop");
  if (stop.is_string() || (stop.is_array() && !stop.empty() && stop.front().is_string())) {
    return absl::InvalidArgumentError(
        "stop strings are not supported (lathe has no tokenizer); send stop token ids instead");
  }
  // A list of ints: each token ends a sample on its own.
  for (const json& t : stop) {
    std::string tokens;
    if (absl::Status s = TokensFromJson(json::array({t}), &tokens); !s.ok()) return s;
    out->add_stop_tokens()->add_chunks()->mutable_encoded_text()->set_tokens(std::move(tokens));
  }
  return absl::OkStatus();
}

lathe::v1::TensorData TensorFromJson(const json& in) {
  lathe::v1::TensorData out;
  const std::string dtype = in.at("dtype").get<std::string>();
  const json& data = in.at("data");
  std::string bytes;
  if (dtype == "int64") {
    out.set_dtype(lathe::v1::INT64);
    for (const json& v : data) Append<int64_t>(&bytes, Number<int64_t>(v, "a tensor element"));
  } else if (dtype == "float32") {
    out.set_dtype(lathe::v1::FLOAT32);
    for (const json& v : data) Append<float>(&bytes, v.is_null() ? NAN : Number<float>(v, "a tensor element"));
  } else {
    throw json::type_error::create(302, "dtype must be \"int64\" or \"float32\"", &in);
  }
  if (in.contains("shape") && !in.at("shape").is_null()) {
    for (const json& d : in.at("shape")) out.add_shape(Number<int64_t>(d, "a shape dimension"));
  } else {
    out.add_shape(static_cast<int64_t>(data.size()));
  }
  out.set_data(std::move(bytes));
  return out;
}

// Values of `bytes` in `dtype` as JSON numbers (NaN as null).
json ValuesToJson(lathe::v1::DType dtype, const std::string& bytes) {
  json out = json::array();
  auto number = [](double v) { return std::isfinite(v) ? json(v) : json(nullptr); };
  switch (dtype) {
    case lathe::v1::FLOAT32:
      for (size_t i = 0; i < bytes.size() / 4; ++i) out.push_back(number(Read<float>(bytes, i)));
      break;
    case lathe::v1::INT64:
      for (size_t i = 0; i < bytes.size() / 8; ++i) out.push_back(Read<int64_t>(bytes, i));
      break;
    case lathe::v1::INT32:
      for (size_t i = 0; i < bytes.size() / 4; ++i) out.push_back(Read<int32_t>(bytes, i));
      break;
    default:
      break;
  }
  return out;
}

const char* DtypeName(lathe::v1::DType dtype) {
  switch (dtype) {
    case lathe::v1::INT64: return "int64";
    case lathe::v1::INT32: return "int32";
    default: return "float32";
  }
}

}  // namespace

json ParseJsonBody(const std::string& body) {
  const json::parser_callback_t limit_depth = [](int depth, json::parse_event_t, json&) {
    if (depth > kMaxJsonBodyDepth) {
      throw json::out_of_range::create(
          406, absl::StrCat("the body nests deeper than ", kMaxJsonBodyDepth, " levels"), nullptr);
    }
    return true;
  };
  return json::parse(body, limit_depth);
}

absl::Status ForwardBackwardFromProto(const tinker::ForwardBackwardRequest& request, lathe::v1::SubmitRequest* op) {
  op->set_run_id(request.model_id());
  op->set_seq_id(request.seq_id());
  lathe::v1::ForwardBackwardInput* input = OpInput(request.forward_only(), op);
  input->set_loss_fn(request.loss_fn());
  for (const tinker::Datum& datum : request.data()) {
    if (absl::Status s = DatumFromProto(datum, input->add_data()); !s.ok()) return s;
  }
  // The SDK writes numbers to both maps and text only to v2; v2 wins.
  for (const auto& [key, value] : request.loss_fn_config()) (*input->mutable_loss_fn_config())[key] = value;
  for (const auto& [key, value] : request.loss_fn_config_v2()) {
    if (value.has_text()) {
      return absl::InvalidArgumentError(
          absl::StrCat("loss_fn_config ", runtime::QuoteForMessage(key), ": text values are not supported"));
    }
    (*input->mutable_loss_fn_config())[key] = value.number();
  }
  return absl::OkStatus();
}

absl::Status ForwardBackwardFromJson(const json& body, bool forward_only, lathe::v1::SubmitRequest* op) {
  op->set_run_id(String(body, "model_id"));
  op->set_seq_id(Number<int64_t>(body.at("seq_id"), "seq_id"));
  // /api/v1/forward's body names its input forward_input.
  const json& fb = body.at(forward_only && body.contains("forward_input") ? "forward_input" : "forward_backward_input");
  lathe::v1::ForwardBackwardInput* input = OpInput(forward_only, op);
  input->set_loss_fn(String(fb, "loss_fn"));
  for (const json& datum : fb.at("data")) {
    lathe::v1::Datum* out = input->add_data();
    for (const json& chunk : datum.at("model_input").at("chunks")) {
      if (chunk.value("type", "encoded_text") != "encoded_text") {
        return absl::InvalidArgumentError("only encoded_text chunks are supported (no image input)");
      }
      std::string tokens;
      if (absl::Status s = TokensFromJson(chunk.at("tokens"), &tokens); !s.ok()) return s;
      out->mutable_model_input()->add_chunks()->mutable_encoded_text()->set_tokens(std::move(tokens));
    }
    for (const auto& [name, tensor] : datum.at("loss_fn_inputs").items()) {
      (*out->mutable_loss_fn_inputs())[name] = TensorFromJson(tensor);
    }
  }
  if (fb.contains("loss_fn_config") && !fb.at("loss_fn_config").is_null()) {
    for (const auto& [key, value] : fb.at("loss_fn_config").items()) {
      if (value.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat("loss_fn_config ", runtime::QuoteForMessage(key), ": text values are not supported"));
      }
      (*input->mutable_loss_fn_config())[key] = Number<double>(value, "a loss_fn_config value");
    }
  }
  return absl::OkStatus();
}

std::string ForwardBackwardOutputToProto(const lathe::v1::ForwardBackwardOutput& output) {
  tinker::ForwardBackwardOutput out;
  out.set_loss_fn_output_type(output.loss_fn_output_type().empty() ? "ArrayRecord" : output.loss_fn_output_type());
  // One record per datum: each datum's tensors may have their own shape.
  for (const lathe::v1::LossFnOutput& datum : output.loss_fn_outputs()) {
    tinker::ArrayRecord* record = out.add_loss_fn_outputs();
    record->set_num_datums(1);
    for (const auto& [name, tensor] : datum.tensors()) {
      tinker::BatchedTensor& batched = (*record->mutable_fields())[name];
      batched.set_data(tensor.data());
      std::string offsets;
      Append<int64_t>(&offsets, 0);
      Append<int64_t>(&offsets, static_cast<int64_t>(tensor.data().size()));
      batched.set_offsets(std::move(offsets));
      batched.set_dtype(static_cast<tinker::DType>(tensor.dtype()));
      for (int d = 1; d < tensor.shape_size(); ++d) batched.add_trailing_shape(tensor.shape(d));
    }
  }
  for (const auto& [key, value] : output.metrics()) (*out.mutable_metrics())[key] = value;
  return out.SerializeAsString();
}

json ForwardBackwardOutputToJson(const lathe::v1::ForwardBackwardOutput& output) {
  json outputs = json::array();
  for (const lathe::v1::LossFnOutput& datum : output.loss_fn_outputs()) {
    json tensors = json::object();
    for (const auto& [name, tensor] : datum.tensors()) {
      tensors[name] = {{"data", ValuesToJson(tensor.dtype(), tensor.data())},
                       {"dtype", DtypeName(tensor.dtype())},
                       {"shape", json(std::vector<int64_t>(tensor.shape().begin(), tensor.shape().end()))}};
    }
    outputs.push_back(std::move(tensors));
  }
  json metrics = json::object();
  for (const auto& [key, value] : output.metrics()) metrics[key] = value;
  return {{"loss_fn_output_type", output.loss_fn_output_type().empty() ? "ArrayRecord" : output.loss_fn_output_type()},
          {"loss_fn_outputs", std::move(outputs)},
          {"metrics", std::move(metrics)}};
}

absl::Status SampleFromJson(const json& body, const std::string& model_path, lathe::v1::SampleOp* op) {
  for (const char* key : {"topk_sample_logprobs", "prompt_alt_tokens_k"}) {
    if (Has(body, key) && Number<int64_t>(body.at(key), key) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(key, " is not supported"));
    }
  }
  for (const char* key : {"target_prompt_logprobs", "prompt_logprobs_last_n"}) {
    if (Has(body, key)) return absl::InvalidArgumentError(absl::StrCat(key, " is not supported"));
  }
  if (body.value("record_stability_info", false)) {
    return absl::InvalidArgumentError("record_stability_info (stable_reinforce) is not supported");
  }
  std::string tokens;
  for (const json& chunk : body.at("prompt").at("chunks")) {
    if (chunk.value("type", "encoded_text") != "encoded_text") {
      return absl::InvalidArgumentError("only encoded_text prompt chunks are supported (no image input)");
    }
    if (absl::Status s = TokensFromJson(chunk.at("tokens"), &tokens); !s.ok()) return s;
  }
  op->mutable_prompt()->add_chunks()->mutable_encoded_text()->set_tokens(std::move(tokens));
  op->set_num_samples(Has(body, "num_samples") ? Number<int32_t>(body.at("num_samples"), "num_samples") : 1);
  op->set_include_prompt_logprobs(body.value("prompt_logprobs", false));
  op->set_topk_prompt_logprobs(Has(body, "topk_prompt_logprobs") ? Number<int32_t>(body.at("topk_prompt_logprobs"), "topk_prompt_logprobs") : 0);
  op->set_model_path(model_path);
  return ParamsFromJson(body.value("sampling_params", json::object()), op->mutable_params());
}

std::string SampleResponseToProto(const lathe::v1::SampleResult& result) {
  tinker::SampleResponse out;
  for (const lathe::v1::SampledSequence& seq : result.sequences()) {
    tinker::SampledSequence* s = out.add_sequences();
    s->set_stop_reason(seq.stop_reason() == lathe::v1::STOP ? tinker::STOP_REASON_STOP : tinker::STOP_REASON_LENGTH);
    s->set_tokens(seq.tokens());
    s->set_logprobs(seq.logprobs());
  }
  if (!result.prompt_logprobs().empty()) out.set_prompt_logprobs(result.prompt_logprobs());
  if (result.has_topk_prompt_logprobs() && result.topk_prompt_logprobs().k() > 0) {
    const lathe::v1::TopkPromptLogprobs& in = result.topk_prompt_logprobs();
    tinker::TopkLogprobs* topk = out.mutable_topk_prompt_logprobs();
    topk->set_token_ids(in.token_ids());
    topk->set_logprobs(in.logprobs());
    topk->set_k(in.k());
    topk->set_length(in.prompt_length());
  }
  return out.SerializeAsString();
}

lathe::v1::AdamParams AdamFromJson(const json& adam) {
  if (!adam.is_object()) throw json::type_error::create(302, "adam_params must be an object", &adam);
  lathe::v1::AdamParams out;
  // The SDK always sends every field; null is how it serialises NaN and
  // infinity, never "use the default".
  auto take = [&adam](const char* key, auto setter) {
    if (!adam.contains(key)) return;
    if (adam.at(key).is_null()) {
      throw json::type_error::create(302, std::string("adam_params.") + key + " is null (NaN or infinity)", &adam);
    }
    setter(Number<double>(adam.at(key), key));
  };
  take("learning_rate", [&out](double v) { out.set_learning_rate(v); });
  take("beta1", [&out](double v) { out.set_beta1(v); });
  take("beta2", [&out](double v) { out.set_beta2(v); });
  take("eps", [&out](double v) { out.set_eps(v); });
  take("weight_decay", [&out](double v) { out.set_weight_decay(v); });
  take("grad_clip_norm", [&out](double v) { out.set_grad_clip_norm(v); });
  return out;
}

lathe::v1::LoraConfig LoraFromJson(const json& lora) {
  lathe::v1::LoraConfig out;
  out.set_rank(Number<int32_t>(lora.at("rank"), "lora_config.rank"));
  if (lora.contains("seed") && !lora.at("seed").is_null()) out.set_seed(Number<int64_t>(lora.at("seed"), "lora_config.seed"));
  if (lora.contains("train_attn")) out.set_train_attn(lora.at("train_attn").get<bool>());
  if (lora.contains("train_mlp")) out.set_train_mlp(lora.at("train_mlp").get<bool>());
  if (lora.contains("train_unembed")) out.set_train_unembed(lora.at("train_unembed").get<bool>());
  return out;
}

}  // namespace lathe::http
