// The SFT data file format and the synthetic data generator.
#include "core/sft_data.h"

#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "core/status.h"

namespace lathe::runtime {
namespace {

using nlohmann::json;

template <typename T>
lathe::v1::TensorData Wire(const std::vector<T>& values, lathe::v1::DType dtype) {
  lathe::v1::TensorData t;
  t.set_dtype(dtype);
  t.add_shape(static_cast<int64_t>(values.size()));
  t.set_data(values.data(), values.size() * sizeof(T));
  return t;
}

lathe::v1::Datum MakeDatum(const std::vector<int32_t>& input, const std::vector<int64_t>& targets,
                           const std::vector<float>& weights) {
  lathe::v1::Datum d;
  d.mutable_model_input()->add_chunks()->mutable_encoded_text()->set_tokens(
      input.data(), input.size() * sizeof(int32_t));
  (*d.mutable_loss_fn_inputs())["target_tokens"] = Wire(targets, lathe::v1::INT64);
  (*d.mutable_loss_fn_inputs())["weights"] = Wire(weights, lathe::v1::FLOAT32);
  return d;
}

absl::StatusOr<lathe::v1::Datum> ParseLine(const json& j) {
  std::vector<int32_t> input;
  std::vector<int64_t> targets;
  std::vector<float> weights;
  if (j.contains("tokens")) {
    auto tokens = j.at("tokens").get<std::vector<int64_t>>();
    if (tokens.size() < 2) return absl::InvalidArgumentError("\"tokens\" needs at least 2 ids");
    input.assign(tokens.begin(), tokens.end() - 1);
    targets.assign(tokens.begin() + 1, tokens.end());
    weights = j.contains("weights") ? j.at("weights").get<std::vector<float>>()
                                    : std::vector<float>(targets.size(), 1.0f);
  } else if (j.contains("model_input")) {
    input = j.at("model_input").get<std::vector<int32_t>>();
    const json& in = j.at("loss_fn_inputs");
    targets = in.at("target_tokens").get<std::vector<int64_t>>();
    weights = in.contains("weights") ? in.at("weights").get<std::vector<float>>()
                                     : std::vector<float>(targets.size(), 1.0f);
  } else {
    return absl::InvalidArgumentError("needs \"tokens\" or \"model_input\"");
  }
  if (weights.size() != targets.size()) {
    return absl::InvalidArgumentError("weights and targets differ in length");
  }
  return MakeDatum(input, targets, weights);
}

}  // namespace

absl::StatusOr<std::vector<lathe::v1::Datum>> ReadSftJsonl(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::vector<lathe::v1::Datum> data;
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    absl::StatusOr<lathe::v1::Datum> datum = absl::InvalidArgumentError("not a JSON object");
    if (j.is_object()) {
      try {
        datum = ParseLine(j);
      } catch (const json::exception& e) {
        datum = absl::InvalidArgumentError(e.what());
      }
    }
    if (!datum.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", number, ": ", datum.status().message()));
    }
    data.push_back(*std::move(datum));
  }
  if (data.empty()) return absl::InvalidArgumentError(absl::StrCat(path, " holds no datums"));
  return data;
}

absl::Status WriteSyntheticSftData(const std::string& path, int64_t vocab_size, int64_t count,
                                   int64_t length, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::ofstream out(path);
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  for (int64_t i = 0; i < count; ++i) {
    int64_t token = static_cast<int64_t>(rng() % vocab_size);
    const int64_t stride = 1 + static_cast<int64_t>(rng() % 3);
    json tokens = json::array();
    for (int64_t t = 0; t < length; ++t, token = (token + stride) % vocab_size) tokens.push_back(token);
    out << json{{"tokens", tokens}}.dump() << "\n";
  }
  return out ? absl::OkStatus() : absl::InternalError(absl::StrCat("cannot write ", path));
}

}  // namespace lathe::runtime
