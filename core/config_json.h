// Typed reads of config.json fields whose errors name the field; shared by
// the config readers (model_config.cc, qwen3_5_config.cc). Internal.
#ifndef LATHE_CORE_CONFIG_JSON_H_
#define LATHE_CORE_CONFIG_JSON_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace lathe::runtime::config_json {

using json = nlohmann::json;

// InvalidArgument "config.json: field '<field>' <what>".
absl::Status FieldError(const std::string& field, const std::string& what);

// An integer field >= 0; `fallback` when absent or null, and `fallback` < 0
// means required.
absl::StatusOr<int64_t> Int(const json& j, const std::string& key, int64_t fallback = -1);
absl::StatusOr<double> Real(const json& j, const std::string& key, double fallback);
absl::StatusOr<bool> Bool(const json& j, const std::string& key, bool fallback);
absl::StatusOr<std::string> Str(const json& j, const std::string& key, const std::string& fallback);

}  // namespace lathe::runtime::config_json

#endif  // LATHE_CORE_CONFIG_JSON_H_
