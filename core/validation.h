// Checks a batch of datums before any state changes, so that a refused
// operation leaves weights, adapters, optimizer state and gradients untouched.
#ifndef LATHE_CORE_VALIDATION_H_
#define LATHE_CORE_VALIDATION_H_

#include <cstdint>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"
#include "lathe/v1/types.pb.h"

namespace lathe::runtime {

struct BatchLimits {
  int64_t vocab_size = 0;
  int64_t max_seq_len = 0;
  bool allow_empty = false;  // a replica's part of a batch may hold no datums
};

// OK, or InvalidArgument naming the datum index and field: an empty batch, an
// unknown loss or loss_fn_config key, a non-finite config value, an empty or
// over-long sequence, a token id outside the vocabulary, a missing or unknown
// loss_fn_inputs key, a tensor of the wrong dtype, shape or byte length, a
// target outside the vocabulary (other than -100), a second dimension longer
// than the vocabulary, a float input or config value that is not finite in
// float32 (see CheckFloat32).
absl::Status ValidateBatch(const lathe::v1::ForwardBackwardInput& input, const BatchLimits& limits);

// The token ids of a model input (concatenated text chunks).
// InvalidArgument for a chunk without tokens or a byte length not a multiple of 4.
absl::StatusOr<std::vector<int32_t>> InputTokens(const lathe::v1::ModelInput& input);
// The token ids of a datum's model_input (concatenated text chunks).
// InvalidArgument for a chunk without tokens or a byte length not a multiple of 4.
absl::StatusOr<std::vector<int32_t>> DatumTokens(const lathe::v1::Datum& datum);

// OK when `value` is finite and within float32's range (|x| <= FLT_MAX), so
// the computation, which holds it as a float, sees the same finite number.
// With `normal`, a nonzero value must also be at least FLT_MIN in magnitude
// (a denormal divisor or scale overflows). InvalidArgument naming `field`.
absl::Status CheckFloat32(double value, absl::string_view field, bool normal = false);

// Bytes per element of a wire dtype; 0 for DTYPE_UNSPECIFIED.
int64_t WireDtypeSize(lathe::v1::DType dtype);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_VALIDATION_H_
