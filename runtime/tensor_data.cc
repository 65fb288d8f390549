// Wire tensor conversion; see tensor_data.h.
#include "runtime/tensor_data.h"

#include <ATen/ATen.h>

#include <vector>

namespace lathe::runtime {

at::Tensor TensorFromWire(const lathe::v1::TensorData& t) {
  std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
  at::ScalarType type = at::kFloat;
  switch (t.dtype()) {
    case lathe::v1::INT64: type = at::kLong; break;
    case lathe::v1::INT32: type = at::kInt; break;
    case lathe::v1::FLOAT64: type = at::kDouble; break;
    case lathe::v1::BFLOAT16: type = at::kBFloat16; break;
    case lathe::v1::FLOAT16: type = at::kHalf; break;
    default: type = at::kFloat; break;
  }
  at::Tensor view = at::from_blob(const_cast<char*>(t.data().data()), shape, at::TensorOptions().dtype(type));
  bool integral = type == at::kLong || type == at::kInt;
  return view.to(integral ? at::kLong : at::kFloat, false, /*copy=*/true);
}

lathe::v1::TensorData TensorToWire(const at::Tensor& t) {
  bool integral = !at::isFloatingType(t.scalar_type());
  at::Tensor c = t.detach().to(at::kCPU).to(integral ? at::kLong : at::kFloat).contiguous();
  lathe::v1::TensorData out;
  out.set_dtype(integral ? lathe::v1::INT64 : lathe::v1::FLOAT32);
  for (int64_t d : c.sizes()) out.add_shape(d);
  out.set_data(c.data_ptr(), c.nbytes());
  return out;
}

}  // namespace lathe::runtime
