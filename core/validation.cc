// Validation of forward / forward_backward inputs against the loss specs.
#include "core/validation.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/loss_spec.h"
#include "core/quote.h"
#include "core/status.h"

namespace lathe::runtime {
namespace {

using lathe::v1::DType;
using lathe::v1::TensorData;

template <typename T>
std::vector<T> Values(const TensorData& t) {
  std::vector<T> out(t.data().size() / sizeof(T));
  std::memcpy(out.data(), t.data().data(), out.size() * sizeof(T));
  return out;
}

absl::Status DatumError(int index, const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("datum ", index, ": ", field, " ", what));
}

absl::Status CheckTensorShape(int index, const std::string& key, const TensorData& t, int64_t n,
                              bool allow_2d, int64_t vocab) {
  const std::string field = absl::StrCat("loss_fn_inputs['", key, "']");
  const bool is_target = key == "target_tokens";
  const bool int_ok = t.dtype() == lathe::v1::INT64 || t.dtype() == lathe::v1::INT32;
  const bool float_ok = t.dtype() == lathe::v1::FLOAT32 || t.dtype() == lathe::v1::FLOAT64;
  if (is_target ? !int_ok : !float_ok) {
    return DatumError(index, field, is_target ? "must have dtype int64 or int32"
                                              : "must have dtype float32 or float64");
  }
  const auto& shape = t.shape();
  if (shape.empty() || shape.size() > 2 || (shape.size() == 2 && !allow_2d)) {
    return DatumError(index, field, allow_2d ? "must have shape (N,) or (N, K)" : "must have shape (N,)");
  }
  if (shape[0] != n) {
    return DatumError(index, field, absl::StrCat("has length ", shape[0], " but model_input has ", n, " tokens"));
  }
  for (int64_t d : shape) {
    if (d <= 0) return DatumError(index, field, "has an empty dimension");
  }
  // A second dimension picks K tokens per position, at most the vocabulary;
  // with it bounded (and N <= max_seq_len) the element count cannot overflow.
  if (shape.size() == 2 && shape[1] > vocab) {
    return DatumError(index, field, absl::StrCat("has ", shape[1], " entries per position; at most ", vocab,
                                                 " (the vocabulary size) are allowed"));
  }
  const int64_t count = shape.size() == 2 ? shape[0] * shape[1] : shape[0];
  if (static_cast<int64_t>(t.data().size()) != count * WireDtypeSize(t.dtype())) {
    return DatumError(index, field, "has a byte length that does not match its shape and dtype");
  }
  return absl::OkStatus();
}

// Integer tensors are read as integers: a double cannot hold every int64.
template <typename T>
absl::Status CheckTokens(int index, const std::string& field, const TensorData& t, int64_t vocab) {
  const std::vector<T> values = Values<T>(t);
  for (size_t i = 0; i < values.size(); ++i) {
    const int64_t v = values[i];
    if (v != kIgnoreTarget && (v < 0 || v >= vocab)) {
      return DatumError(index, field, absl::StrCat("holds token id ", v, " at element ", i,
                                                   "; the vocabulary has ", vocab, " tokens"));
    }
  }
  return absl::OkStatus();
}

// Float inputs are computed in float32: each must be finite there.
template <typename T>
absl::Status CheckFloats(int index, const std::string& field, const TensorData& t) {
  const std::vector<T> values = Values<T>(t);
  for (size_t i = 0; i < values.size(); ++i) {
    absl::Status s = CheckFloat32(static_cast<double>(values[i]), absl::StrCat(field, " element ", i));
    if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("datum ", index, ": ", s.message()));
  }
  return absl::OkStatus();
}

absl::Status CheckValues(int index, const std::string& key, const TensorData& t, int64_t vocab) {
  const std::string field = absl::StrCat("loss_fn_inputs['", key, "']");
  switch (t.dtype()) {
    case lathe::v1::INT64: return CheckTokens<int64_t>(index, field, t, vocab);
    case lathe::v1::INT32: return CheckTokens<int32_t>(index, field, t, vocab);
    case lathe::v1::FLOAT32: return CheckFloats<float>(index, field, t);
    case lathe::v1::FLOAT64: return CheckFloats<double>(index, field, t);
    default: return DatumError(index, field, "has an unsupported dtype");
  }
}

absl::Status CheckDatum(int index, const lathe::v1::Datum& datum, const LossSpec& spec,
                        const BatchLimits& limits) {
  auto tokens = DatumTokens(datum);
  if (!tokens.ok()) return DatumError(index, "model_input", std::string(tokens.status().message()));
  const int64_t n = static_cast<int64_t>(tokens->size());
  if (n == 0) return DatumError(index, "model_input", "is empty");
  if (n > limits.max_seq_len) {
    return DatumError(index, "model_input", absl::StrCat("has ", n, " tokens; max_seq_len is ", limits.max_seq_len));
  }
  for (int64_t i = 0; i < n; ++i) {
    int32_t tok = (*tokens)[i];
    if (tok < 0 || tok >= limits.vocab_size) {
      return DatumError(index, "model_input", absl::StrCat("holds token id ", tok, " at position ", i,
                                                           "; the vocabulary has ", limits.vocab_size, " tokens"));
    }
  }
  const auto& inputs = datum.loss_fn_inputs();
  for (const std::string& key : spec.required_inputs) {
    if (!inputs.contains(key)) {
      return DatumError(index, "loss_fn_inputs", absl::StrCat("lacks '", key, "', required by ", spec.name));
    }
  }
  const bool allow_2d = spec.name == "cross_entropy";
  for (const auto& [key, tensor] : inputs) {
    const auto& req = spec.required_inputs;
    const auto& opt = spec.optional_inputs;
    if (std::find(req.begin(), req.end(), key) == req.end() &&
        std::find(opt.begin(), opt.end(), key) == opt.end()) {
      return DatumError(index, "loss_fn_inputs", absl::StrCat("has key ", QuoteForMessage(key), ", which ", spec.name,
                                                              " does not take (it takes ",
                                                              absl::StrJoin(req, ", "),
                                                              opt.empty() ? "" : ", ", absl::StrJoin(opt, ", "), ")"));
    }
    LATHE_RETURN_IF_ERROR(CheckTensorShape(index, key, tensor, n, allow_2d && (key == "target_tokens" || key == "weights"),
                                           limits.vocab_size));
    LATHE_RETURN_IF_ERROR(CheckValues(index, key, tensor, limits.vocab_size));
  }
  auto w = inputs.find("weights");
  if (w != inputs.end() &&
      !std::equal(w->second.shape().begin(), w->second.shape().end(),
                  inputs.at("target_tokens").shape().begin(), inputs.at("target_tokens").shape().end())) {
    return DatumError(index, "loss_fn_inputs['weights']", "must have the shape of target_tokens");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckFloat32(double value, absl::string_view field, bool normal) {
  const double magnitude = std::fabs(value);
  if (!std::isfinite(value) || magnitude > std::numeric_limits<float>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(field, " is ", value, "; it must be finite in float32 (|x| <= ",
                                                   std::numeric_limits<float>::max(), ")"));
  }
  if (normal && value != 0 && magnitude < std::numeric_limits<float>::min()) {
    return absl::InvalidArgumentError(absl::StrCat(field, " is ", value, "; it must be 0 or at least ",
                                                   std::numeric_limits<float>::min(),
                                                   " in magnitude (a normal float32)"));
  }
  return absl::OkStatus();
}

int64_t WireDtypeSize(DType dtype) {
  switch (dtype) {
    case lathe::v1::FLOAT32: case lathe::v1::INT32: return 4;
    case lathe::v1::INT64: case lathe::v1::FLOAT64: return 8;
    case lathe::v1::BFLOAT16: case lathe::v1::FLOAT16: return 2;
    default: return 0;
  }
}

absl::StatusOr<std::vector<int32_t>> DatumTokens(const lathe::v1::Datum& datum) {
  return InputTokens(datum.model_input());
}

absl::StatusOr<std::vector<int32_t>> InputTokens(const lathe::v1::ModelInput& input) {
  std::vector<int32_t> tokens;
  for (const auto& chunk : input.chunks()) {
    if (!chunk.has_encoded_text()) return absl::InvalidArgumentError("has a chunk that is not encoded text");
    const std::string& bytes = chunk.encoded_text().tokens();
    if (bytes.size() % 4 != 0) return absl::InvalidArgumentError("has a token chunk whose byte length is not a multiple of 4");
    if (bytes.empty()) continue;  // memcpy from or to a null pointer is undefined, even of 0 bytes
    size_t old = tokens.size();
    tokens.resize(old + bytes.size() / 4);
    std::memcpy(tokens.data() + old, bytes.data(), bytes.size());
  }
  return tokens;
}

absl::Status ValidateBatch(const lathe::v1::ForwardBackwardInput& input, const BatchLimits& limits) {
  const LossSpec* spec = FindLoss(input.loss_fn());
  if (spec == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unknown loss_fn ", QuoteForMessage(input.loss_fn()), " (known: ", LossNames(), ")"));
  }
  for (const auto& [key, value] : input.loss_fn_config()) {
    if (spec->config_defaults.count(key) == 0) {
      std::vector<std::string> known;
      for (const auto& [k, v] : spec->config_defaults) known.push_back(k);
      return absl::InvalidArgumentError(absl::StrCat("loss_fn_config key ", QuoteForMessage(key), " is not accepted by ", spec->name,
                                                     known.empty() ? " (it takes no config)"
                                                                   : absl::StrCat(" (it takes ", absl::StrJoin(known, ", "), ")")));
    }
    LATHE_RETURN_IF_ERROR(CheckFloat32(value, absl::StrCat("loss_fn_config['", key, "']")));
  }
  if (input.data_size() == 0 && !limits.allow_empty) {
    return absl::InvalidArgumentError("empty batch: at least one datum is required");
  }
  for (int i = 0; i < input.data_size(); ++i) {
    LATHE_RETURN_IF_ERROR(CheckDatum(i, input.data(i), *spec, limits));
  }
  return absl::OkStatus();
}

}  // namespace lathe::runtime
