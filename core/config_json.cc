// Typed config.json field reads; see config_json.h.
#include "core/config_json.h"

#include "absl/strings/str_cat.h"

namespace lathe::runtime::config_json {

absl::Status FieldError(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: field '", field, "' ", what));
}

// Reads an integer field; `fallback` < 0 means required.
absl::StatusOr<int64_t> Int(const json& j, const std::string& key, int64_t fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback < 0) return FieldError(key, "is required");
    return fallback;
  }
  if (!it->is_number_integer()) return FieldError(key, "must be an integer");
  int64_t v = it->get<int64_t>();
  if (v < 0) return FieldError(key, "must not be negative");
  return v;
}

absl::StatusOr<double> Real(const json& j, const std::string& key, double fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number()) return FieldError(key, "must be a number");
  return it->get<double>();
}

absl::StatusOr<bool> Bool(const json& j, const std::string& key, bool fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return FieldError(key, "must be true or false");
  return it->get<bool>();
}

// Reads a string field (json::value() would throw on another type).
absl::StatusOr<std::string> Str(const json& j, const std::string& key, const std::string& fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_string()) return FieldError(key, "must be a string");
  return it->get<std::string>();
}

}  // namespace lathe::runtime::config_json
