// Conversion between the wire tensor (lathe.v1.TensorData) and at::Tensor.
#ifndef LATHE_RUNTIME_TENSOR_DATA_H_
#define LATHE_RUNTIME_TENSOR_DATA_H_

#include <ATen/core/Tensor.h>

#include "lathe/v1/types.pb.h"

namespace lathe::runtime {

// int32/int64 become int64, float32/float64 become float32 (CPU).
// REQUIRES: the tensor passed validation (dtype known, byte length matches).
at::Tensor TensorFromWire(const lathe::v1::TensorData& t);
// A float32 or int64 copy of a CPU or device tensor.
lathe::v1::TensorData TensorToWire(const at::Tensor& t);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_TENSOR_DATA_H_
