// quantization_config parsing and the block-FP8 / pack-quantized dequantizers.
#include "core/quantization.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>
#include <limits>
#include <optional>
#include <regex>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/config_json.h"
#include "core/status.h"

namespace lathe::runtime {
namespace {

using config_json::FieldError;
using config_json::json;

const std::string kField = "quantization_config.";

absl::StatusOr<std::vector<std::string>> StringList(const json& q, const std::string& key) {
  std::vector<std::string> out;
  auto it = q.find(key);
  if (it == q.end() || it->is_null()) return out;
  if (!it->is_array()) return FieldError(kField + key, "must be a list of module names");
  for (const json& v : *it) {
    if (!v.is_string()) return FieldError(kField + key, "must be a list of module names");
    out.push_back(v.get<std::string>());
  }
  return out;
}

absl::Status ReadFp8(const json& q, QuantizationConfig& c) {
  c.method = QuantMethod::kFp8Block;
  auto fmt = q.find("fmt");
  if (fmt != q.end() && !fmt->is_null() && (!fmt->is_string() || fmt->get<std::string>() != "e4m3")) {
    return FieldError(kField + "fmt", "must be \"e4m3\" (float8_e4m3fn weights)");
  }
  auto block = q.find("weight_block_size");
  if (block != q.end()) {
    if (!block->is_array() || block->size() != 2 || !(*block)[0].is_number_integer() ||
        !(*block)[1].is_number_integer() || (*block)[0].get<int64_t>() <= 0 || (*block)[1].get<int64_t>() <= 0) {
      return FieldError(kField + "weight_block_size", "must be two positive integers [rows, cols]");
    }
    c.block_rows = (*block)[0].get<int64_t>();
    c.block_cols = (*block)[1].get<int64_t>();
  }
  LATHE_ASSIGN_OR_RETURN(c.not_converted, StringList(q, "modules_to_not_convert"));
  return absl::OkStatus();
}

// One config group's weight scheme; every group must agree, since a module's
// group is not named in the checkpoint.
absl::Status ReadGroup(const std::string& name, const json& g, QuantizationConfig& c, bool first) {
  const std::string field = absl::StrCat(kField, "config_groups.", name);
  if (!g.is_object()) return FieldError(field, "must be an object");
  auto format = g.find("format");
  if (format != g.end() && !format->is_null() && *format != "pack-quantized") {
    return FieldError(field + ".format", "must be \"pack-quantized\"");
  }
  auto inputs = g.find("input_activations");
  if (inputs != g.end() && !inputs->is_null()) {
    return FieldError(field + ".input_activations", "must be null (lathe reads weight-only quantization)");
  }
  auto w = g.find("weights");
  if (w == g.end() || !w->is_object()) return FieldError(field + ".weights", "must be an object");
  // Typed before they are read: a value of another JSON type is refused by field.
  for (const char* key : {"type", "strategy"}) {
    if (w->contains(key) && !(*w)[key].is_string()) return FieldError(field + ".weights." + key, "must be a string");
  }
  if (w->contains("symmetric") && !(*w)["symmetric"].is_boolean()) {
    return FieldError(field + ".weights.symmetric", "must be true or false");
  }
  if (w->contains("num_bits") && !(*w)["num_bits"].is_number_integer()) {
    return FieldError(field + ".weights.num_bits", "must be 2, 4 or 8");
  }
  if (w->value("type", std::string("int")) != "int") return FieldError(field + ".weights.type", "must be \"int\"");
  if (!w->value("symmetric", true)) {
    return FieldError(field + ".weights.symmetric", "is false; only symmetric quantization is supported");
  }
  const int bits = w->value("num_bits", 0);
  if (bits != 2 && bits != 4 && bits != 8) return FieldError(field + ".weights.num_bits", "must be 2, 4 or 8");
  const std::string strategy = w->value("strategy", std::string());
  int64_t group = 0;
  if (strategy == "group") {
    auto gs = w->find("group_size");
    if (gs == w->end() || !gs->is_number_integer() || gs->get<int64_t>() <= 0) {
      return FieldError(field + ".weights.group_size", "must be a positive integer");
    }
    group = gs->get<int64_t>();
  } else if (strategy != "channel") {
    return FieldError(field + ".weights.strategy", "must be \"group\" or \"channel\"");
  }
  if (!first && (bits != c.bits || group != c.group_size)) {
    return FieldError(field, "quantizes differently from another group; lathe reads one scheme per checkpoint");
  }
  c.bits = bits;
  c.group_size = group;
  return absl::OkStatus();
}

absl::Status ReadCompressedTensors(const json& q, QuantizationConfig& c) {
  c.method = QuantMethod::kPackQuantized;
  auto format = q.find("format");
  if (format == q.end() || !format->is_string() || format->get<std::string>() != "pack-quantized") {
    return FieldError(kField + "format", absl::StrCat("is ", format == q.end() ? "absent" : format->dump(),
                                                      "; lathe reads only \"pack-quantized\""));
  }
  auto groups = q.find("config_groups");
  if (groups == q.end() || !groups->is_object() || groups->empty()) {
    return FieldError(kField + "config_groups", "must be a non-empty object");
  }
  bool first = true;
  for (const auto& [name, g] : groups->items()) {
    LATHE_RETURN_IF_ERROR(ReadGroup(name, g, c, first));
    first = false;
  }
  LATHE_ASSIGN_OR_RETURN(c.not_converted, StringList(q, "ignore"));
  return absl::OkStatus();
}

}  // namespace

// One entry per not_converted pattern: its regex (fp8: every pattern;
// compressed-tensors: the "re:" ones), or none.
struct QuantizationConfig::Patterns {
  std::vector<std::optional<std::regex>> regex;
};

namespace {

// The regex a pattern is matched by; InvalidArgument when it does not compile.
absl::StatusOr<std::optional<std::regex>> Compile(const std::string& pattern, QuantMethod method) {
  const bool fp8 = method == QuantMethod::kFp8Block;
  if (!fp8 && !absl::StartsWith(pattern, "re:")) return std::optional<std::regex>();
  try {
    return std::optional<std::regex>(std::regex(fp8 ? pattern : pattern.substr(3)));
  } catch (const std::regex_error& e) {
    return FieldError(kField + (fp8 ? "modules_to_not_convert" : "ignore"),
                      absl::StrCat("holds '", pattern, "', not a regex lathe can read (", e.what(), ")"));
  }
}

// transformers' should_convert_module: the pattern as a regex from the start
// of `name`, ending at a module boundary, or as a plain suffix.
bool MatchesFp8Pattern(const std::string& name, const std::string& pattern, const std::optional<std::regex>& re) {
  if (absl::EndsWith(name, pattern)) return true;
  if (!re) return false;
  for (size_t end = 0; end <= name.size(); ++end) {
    const bool boundary = end == name.size() || name[end] == '.' || (end > 0 && name[end - 1] == '.');
    if (boundary && std::regex_match(name.begin(), name.begin() + end, *re)) return true;
  }
  return false;
}

// compressed-tensors' match_name: "re:" regexes from the start, else the exact name.
bool MatchesIgnore(const std::string& name, const std::string& target, const std::optional<std::regex>& re) {
  if (!absl::StartsWith(target, "re:")) return name == target;
  return re && std::regex_search(name, *re, std::regex_constants::match_continuous);
}

absl::Status CompilePatterns(QuantizationConfig& c) {
  auto patterns = std::make_shared<QuantizationConfig::Patterns>();
  for (const std::string& p : c.not_converted) {
    LATHE_ASSIGN_OR_RETURN(std::optional<std::regex> re, Compile(p, c.method));
    patterns->regex.push_back(std::move(re));
  }
  c.patterns = std::move(patterns);
  return absl::OkStatus();
}

}  // namespace

bool QuantizationConfig::NotConverted(const std::string& module) const {
  if (!text_prefix.empty() && absl::StartsWith(module, text_prefix)) {
    QuantizationConfig bare = *this;
    bare.text_prefix.clear();
    if (bare.NotConverted(module.substr(text_prefix.size()))) return true;
  }
  for (size_t i = 0; i < not_converted.size(); ++i) {
    const std::string& p = not_converted[i];
    std::optional<std::regex> compiled;
    if (patterns == nullptr) {
      absl::StatusOr<std::optional<std::regex>> re = Compile(p, method);
      if (re.ok()) compiled = *std::move(re);
    }
    const std::optional<std::regex>& re = patterns != nullptr ? patterns->regex[i] : compiled;
    if (method == QuantMethod::kFp8Block ? MatchesFp8Pattern(module, p, re) : MatchesIgnore(module, p, re)) return true;
  }
  return false;
}

absl::StatusOr<QuantizationConfig> ParseQuantizationConfig(const std::string& json_text) {
  json q = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (q.is_discarded() || !q.is_object()) return FieldError("quantization_config", "must be an object");
  auto method = q.find("quant_method");
  const std::string name = method != q.end() && method->is_string() ? method->get<std::string>() : "";
  QuantizationConfig c;
  if (name == "fp8") {
    LATHE_RETURN_IF_ERROR(ReadFp8(q, c));
  } else if (name == "compressed-tensors") {
    LATHE_RETURN_IF_ERROR(ReadCompressedTensors(q, c));
  } else {
    return FieldError(kField + "quant_method",
                      absl::StrCat("is ", method == q.end() ? "absent" : method->dump(),
                                   "; lathe reads \"fp8\" (block FP8) and \"compressed-tensors\" (pack-quantized)"));
  }
  LATHE_RETURN_IF_ERROR(CompilePatterns(c));
  return c;
}

namespace {

// ParseQuantizationConfig of the object `q` found at `where` ("quantization_config"
// or "text_config.quantization_config"), its errors naming the field there.
absl::StatusOr<QuantizationConfig> ParseAt(const json& q, const std::string& where) {
  absl::StatusOr<QuantizationConfig> c = ParseQuantizationConfig(q.dump());
  if (c.ok() || where == "quantization_config") return c;
  std::string message(c.status().message());
  const std::string from = "field 'quantization_config";
  if (size_t at = message.find(from); at != std::string::npos) {
    message.replace(at, from.size(), "field '" + where);
  }
  return absl::Status(c.status().code(), message);
}

std::string BlockText(const QuantizationConfig& c) { return absl::StrCat("[", c.block_rows, ", ", c.block_cols, "]"); }
std::string ListText(const std::vector<std::string>& v) { return absl::StrCat("[", absl::StrJoin(v, ", "), "]"); }

// InvalidArgument naming the first field where `text` (text_config's) says
// otherwise than `top`.
absl::Status Agree(const QuantizationConfig& top, const QuantizationConfig& text) {
  auto differ = [](const std::string& field, const std::string& a, const std::string& b) {
    return FieldError("text_config.quantization_config." + field,
                      absl::StrCat("is ", b, " but quantization_config.", field, " is ", a,
                                   "; a checkpoint has one quantization"));
  };
  auto name = [](QuantMethod m) { return std::string(m == QuantMethod::kFp8Block ? "fp8" : "compressed-tensors"); };
  if (top.method != text.method) return differ("quant_method", name(top.method), name(text.method));
  if (top.method == QuantMethod::kFp8Block) {
    if (top.block_rows != text.block_rows || top.block_cols != text.block_cols) {
      return differ("weight_block_size", BlockText(top), BlockText(text));
    }
    if (top.not_converted != text.not_converted) {
      return differ("modules_to_not_convert", ListText(top.not_converted), ListText(text.not_converted));
    }
    return absl::OkStatus();
  }
  if (top.bits != text.bits) return differ("weights.num_bits", absl::StrCat(top.bits), absl::StrCat(text.bits));
  if (top.group_size != text.group_size) {
    return differ("weights.group_size", absl::StrCat(top.group_size), absl::StrCat(text.group_size));
  }
  if (top.not_converted != text.not_converted) {
    return differ("ignore", ListText(top.not_converted), ListText(text.not_converted));
  }
  return absl::OkStatus();
}

bool IsKimiWrapper(const json& j) {
  auto arch = j.find("architectures");
  if (arch == j.end() || !arch->is_array()) return false;
  for (const json& a : *arch) {
    if (a == "KimiK25ForConditionalGeneration" || a == "Kimi_K25ForConditionalGeneration") return true;
  }
  return false;
}

}  // namespace

absl::StatusOr<QuantizationConfig> ReadCheckpointQuantization(const std::string& config_text) {
  json j = json::parse(config_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return QuantizationConfig{};
  std::optional<QuantizationConfig> top, text;
  if (auto q = j.find("quantization_config"); q != j.end() && !q->is_null()) {
    LATHE_ASSIGN_OR_RETURN(top, ParseAt(*q, "quantization_config"));
  }
  if (auto t = j.find("text_config"); t != j.end() && t->is_object()) {
    if (auto q = t->find("quantization_config"); q != t->end() && !q->is_null()) {
      LATHE_ASSIGN_OR_RETURN(text, ParseAt(*q, "text_config.quantization_config"));
    }
  }
  if (top && text) LATHE_RETURN_IF_ERROR(Agree(*top, *text));
  QuantizationConfig c = top ? *std::move(top) : text ? *std::move(text) : QuantizationConfig{};
  if (c.method != QuantMethod::kNone && IsKimiWrapper(j)) c.text_prefix = "language_model.";
  return c;
}

absl::StatusOr<QuantizationConfig> LoadQuantizationConfig(const std::string& dir) {
  const std::string path = dir + "/config.json";
  std::ifstream in(path);
  if (!in) return QuantizationConfig{};
  std::stringstream text;
  text << in.rdbuf();
  absl::StatusOr<QuantizationConfig> c = ReadCheckpointQuantization(text.str());
  if (!c.ok()) return absl::Status(c.status().code(), absl::StrCat(path, ": ", c.status().message()));
  return c;
}

// ---------------------------------------------------------------- dequantizers

float Fp8E4m3ToFloat(uint8_t byte) {
  const int sign = byte >> 7, exp = (byte >> 3) & 0xf, man = byte & 0x7;
  float v;
  if (exp == 0xf && man == 0x7) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 · 2^-6
  } else {
    v = std::ldexp(static_cast<float>(8 + man), exp - 10);  // (1 + man/8) · 2^(exp-7)
  }
  return sign ? -v : v;
}

namespace {

absl::Status Defect(const std::string& tensor, const std::string& what) {
  return absl::DataLossError(absl::StrCat("tensor '", tensor, "': ", what));
}

std::string ShapeText(const std::vector<int64_t>& shape) { return absl::StrCat("[", absl::StrJoin(shape, ", "), "]"); }

// Reads element i of a floating-point scale tensor (the dtype decided once,
// not per element).
class ScaleReader {
 public:
  static absl::StatusOr<ScaleReader> For(const TensorView& v) {
    const Kind kind = v.dtype == "F32" ? kF32 : v.dtype == "BF16" ? kBf16 : v.dtype == "F16" ? kF16
                      : v.dtype == "F8_E8M0" ? kE8m0 : kNone;
    if (kind == kNone) {
      return Defect(v.name, absl::StrCat("scale dtype ", v.dtype, "; expected F32, BF16, F16 or F8_E8M0"));
    }
    return ScaleReader(v.data, kind);
  }
  float operator()(int64_t i) const {
    switch (kind_) {
      case kE8m0:
        return data_[i] == 0xff ? std::nanf("") : std::ldexp(1.0f, int{data_[i]} - 127);
      case kF32: {
        float f;
        std::memcpy(&f, data_ + 4 * i, 4);
        return f;
      }
      default: {
        uint16_t h;
        std::memcpy(&h, data_ + 2 * i, 2);
        if (kind_ == kF16) return HalfToFloat(h);
        const uint32_t bits = uint32_t{h} << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
      }
    }
  }

 private:
  enum Kind { kNone, kF32, kBf16, kF16, kE8m0 };
  ScaleReader(const uint8_t* data, Kind kind) : data_(data), kind_(kind) {}
  static float HalfToFloat(uint16_t h) {
    const int sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float v = exp == 0      ? std::ldexp(static_cast<float>(man), -24)
              : exp == 0x1f ? (man ? std::nanf("") : std::numeric_limits<float>::infinity())
                            : std::ldexp(static_cast<float>(1024 + man), exp - 25);
    return sign ? -v : v;
  }
  const uint8_t* data_;
  Kind kind_;
};

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

absl::Status DequantizeFp8Block(const TensorView& weight, const TensorView& scale_inv, int64_t block_rows,
                                int64_t block_cols, const Region& region, float* out) {
  if (weight.dtype != "F8_E4M3") return Defect(weight.name, absl::StrCat("dtype ", weight.dtype, "; expected F8_E4M3"));
  const size_t nd = weight.shape.size();
  if (nd != 2 && nd != 3) return Defect(weight.name, "a block-FP8 weight must be 2-D or 3-D");
  const int64_t rows = weight.shape[nd - 2], cols = weight.shape[nd - 1];
  std::vector<int64_t> want(weight.shape.begin(), weight.shape.end() - 2);
  want.push_back(CeilDiv(rows, block_rows));
  want.push_back(CeilDiv(cols, block_cols));
  if (scale_inv.shape != want) {
    return Defect(weight.name, absl::StrCat("scale '", scale_inv.name, "' has shape ", ShapeText(scale_inv.shape),
                                            " but ", block_rows, "x", block_cols, " blocks of ",
                                            ShapeText(weight.shape), " need ", ShapeText(want)));
  }
  LATHE_ASSIGN_OR_RETURN(ScaleReader scale, ScaleReader::For(scale_inv));
  float lut[256];
  for (int b = 0; b < 256; ++b) lut[b] = Fp8E4m3ToFloat(static_cast<uint8_t>(b));
  const int64_t srows = want[want.size() - 2], scols = want.back();
  for (int64_t l = region.lead_begin; l < region.lead_begin + region.lead; ++l) {
    for (int64_t r = region.row_begin; r < region.row_begin + region.rows; ++r) {
      const uint8_t* q = weight.data + (l * rows + r) * cols;
      const int64_t srow = (l * srows + r / block_rows) * scols;
      const int64_t end = region.col_begin + region.cols;
      for (int64_t c = region.col_begin; c < end;) {
        const float s = scale(srow + c / block_cols);
        const int64_t block_end = std::min(end, (c / block_cols + 1) * block_cols);
        for (; c < block_end; ++c) *out++ = lut[q[c]] * s;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status DequantizePacked(const TensorView& packed, const TensorView& scale_view,
                              const std::vector<int64_t>& shape, int bits, int64_t group_size,
                              const Region& region, float* out) {
  if (packed.dtype != "I32") return Defect(packed.name, absl::StrCat("dtype ", packed.dtype, "; expected I32"));
  if (shape.size() != 2) return Defect(packed.name, absl::StrCat("weight_shape ", ShapeText(shape), " is not 2-D"));
  const int64_t rows = shape[0], cols = shape[1];
  const int64_t per_word = 32 / bits;
  const std::vector<int64_t> want_packed{rows, CeilDiv(cols, per_word)};
  if (packed.shape != want_packed) {
    return Defect(packed.name, absl::StrCat("has shape ", ShapeText(packed.shape), " but weight_shape ",
                                            ShapeText(shape), " packed ", per_word, " per int32 needs ",
                                            ShapeText(want_packed)));
  }
  const int64_t groups = scale_view.shape.size() == 2 ? scale_view.shape[1] : 0;
  if (scale_view.shape.size() != 2 || scale_view.shape[0] != rows || groups == 0 || cols % groups != 0 ||
      (group_size > 0 && cols / groups != group_size) || (group_size == 0 && groups != 1)) {
    return Defect(packed.name, absl::StrCat("scale '", scale_view.name, "' has shape ", ShapeText(scale_view.shape),
                                            ", which does not match weight_shape ", ShapeText(shape),
                                            group_size > 0 ? absl::StrCat(" in groups of ", group_size,
                                                                          " (quantization_config group_size)")
                                                           : std::string(" per output channel")));
  }
  LATHE_ASSIGN_OR_RETURN(ScaleReader scale, ScaleReader::For(scale_view));
  const int64_t group = cols / groups;
  const uint32_t mask = (1u << bits) - 1;
  const int offset = 1 << (bits - 1);
  for (int64_t r = region.row_begin; r < region.row_begin + region.rows; ++r) {
    const uint8_t* row = packed.data + r * want_packed[1] * 4;
    const int64_t end = region.col_begin + region.cols;
    for (int64_t c = region.col_begin; c < end;) {
      const float s = scale(r * groups + c / group);
      const int64_t group_end = std::min(end, (c / group + 1) * group);
      for (; c < group_end; ++c) {
        uint32_t word;
        std::memcpy(&word, row + (c / per_word) * 4, 4);  // little-endian words, as safetensors stores them
        const int q = static_cast<int>((word >> (bits * (c % per_word))) & mask) - offset;
        *out++ = static_cast<float>(q) * s;
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace lathe::runtime
