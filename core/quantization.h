// Quantized base checkpoints: what config.json's `quantization_config` says
// (block FP8, compressed-tensors pack-quantized INT), and the exact
// dequantization of a region of one quantized weight into fp32.
#ifndef LATHE_CORE_QUANTIZATION_H_
#define LATHE_CORE_QUANTIZATION_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/safetensors.h"

namespace lathe::runtime {

enum class QuantMethod {
  kNone,
  // quant_method "fp8": float8_e4m3fn weights, each with a `weight_scale_inv`
  // companion holding one fp32 (or bf16, or ue8m0) factor per block
  // (DeepSeek-V3, GLM-5.2-FP8). W = fp8(W_q) · scale_inv[block].
  kFp8Block,
  // quant_method "compressed-tensors", format "pack-quantized": `weight_packed`
  // int32 words of `bits`-bit values (the first value in the lowest bits),
  // stored offset by 2^(bits-1); `weight_scale` one factor per group of input
  // columns; `weight_shape` the dequantized shape (Kimi-K2 experts, INT4).
  // W = (unsigned − 2^(bits-1)) · scale[row, col / group].
  kPackQuantized,
};

struct QuantizationConfig {
  QuantMethod method = QuantMethod::kNone;
  int64_t block_rows = 128, block_cols = 128;  // kFp8Block: weight_block_size
  int bits = 4;                                // kPackQuantized: num_bits
  int64_t group_size = 0;                      // kPackQuantized: 0 when not grouped
  // Modules stored unquantized: modules_to_not_convert (fp8) or ignore
  // (compressed-tensors), spelt as the quantizer that wrote them matches.
  std::vector<std::string> not_converted;
  // The checkpoint prefix of a multimodal wrapper's text model
  // ("language_model." for Kimi-K2.5 / K2.6), which not_converted entries may
  // leave out: a quantizer run on the text model names "model.layers.0.mlp",
  // the wrapper's file "language_model.model.layers.0.mlp". Empty otherwise.
  std::string text_prefix;
  // not_converted's regexes, compiled once by ParseQuantizationConfig (null:
  // compiled on each NotConverted call).
  struct Patterns;
  std::shared_ptr<const Patterns> patterns;

  // Whether the quantizer left module `module` ("model.layers.0.mlp.down_proj")
  // in full precision: fp8 as transformers' should_convert_module matches
  // (a prefix up to a module boundary, a regex with the same boundary, or a
  // suffix); compressed-tensors as its match_name ("re:" regexes from the
  // start, otherwise the exact name). Under a text_prefix, the name without
  // it matches too.
  bool NotConverted(const std::string& module) const;
};

// Reads config.json's `quantization_config` object (text of the object, as
// nlohmann parses it). InvalidArgument naming the field for a quant_method or
// format lathe does not read (anything but "fp8" e4m3 and compressed-tensors
// "pack-quantized" symmetric int of 2, 4 or 8 bits), or a malformed field
// (a module pattern that is not a valid regex included).
absl::StatusOr<QuantizationConfig> ParseQuantizationConfig(const std::string& json_text);

// The quantization of a whole config.json (its text): `quantization_config`
// at the top level, or under `text_config` (where the Kimi-K2.5 / K2.6
// wrapper keeps it), or both when they agree; kNone when neither is set (or
// both are null). ParseQuantizationConfig's errors, the field under
// text_config named as such; InvalidArgument naming the field where the two
// disagree (quant_method, num_bits, group_size, weight_block_size, ignore /
// modules_to_not_convert). A Kimi wrapper's config gets text_prefix
// "language_model.".
absl::StatusOr<QuantizationConfig> ReadCheckpointQuantization(const std::string& config_text);

// ReadCheckpointQuantization of <dir>/config.json: kNone when the file is
// absent; its errors, naming the path.
absl::StatusOr<QuantizationConfig> LoadQuantizationConfig(const std::string& dir);

// A 2-D region of a weight: rows [row_begin, row_begin + rows), cols
// [col_begin, col_begin + cols) of each of `lead` stacked matrices starting at
// lead_begin (3-D weights, e.g. fused experts; lead 1 for a matrix).
struct Region {
  int64_t lead_begin = 0, lead = 1;
  int64_t row_begin = 0, rows = 0;
  int64_t col_begin = 0, cols = 0;
  int64_t numel() const { return lead * rows * cols; }
};

// Writes `region` of the block-FP8 weight `weight` (F8_E4M3, 2-D or 3-D) into
// `out` (row-major, region.numel() floats), each value fp8 · scale computed in
// fp32 as transformers does. `scale_inv` must be [..., ceil(R / block_rows),
// ceil(C / block_cols)] (edge blocks may be partial) of F32, BF16, F16 or
// F8_E8M0. DataLoss naming the tensor for another weight or scale dtype, or a
// scale whose shape does not match the weight's blocks.
// REQUIRES: region inside the weight.
absl::Status DequantizeFp8Block(const TensorView& weight, const TensorView& scale_inv, int64_t block_rows,
                                int64_t block_cols, const Region& region, float* out);

// Writes `region` of the pack-quantized weight of 2-D shape `shape` into
// `out`, each value (q − 2^(bits-1)) · scale in fp32 (exact for bf16 scales).
// `packed` must be I32 [R, ceil(C · bits / 32)], `scale` F32/BF16/F16
// [R, G] with C a multiple of G (group C / G, equal to group_size when that is
// set). DataLoss naming the tensor otherwise.
absl::Status DequantizePacked(const TensorView& packed, const TensorView& scale, const std::vector<int64_t>& shape,
                              int bits, int64_t group_size, const Region& region, float* out);

// The value of an fp8 e4m3fn byte (NaN for 0x7f / 0xff).
float Fp8E4m3ToFloat(uint8_t byte);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_QUANTIZATION_H_
