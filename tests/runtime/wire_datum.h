// Building the wire types of a training call in tests: a 1-D tensor from a
// vector, and a cross_entropy datum from its tokens, targets and weights.
#ifndef LATHE_TESTS_RUNTIME_WIRE_DATUM_H_
#define LATHE_TESTS_RUNTIME_WIRE_DATUM_H_

#include <cstdint>
#include <vector>

#include "lathe/v1/types.pb.h"

namespace lathe::runtime {

template <typename T>
lathe::v1::TensorData Wire(const std::vector<T>& v, lathe::v1::DType dtype) {
  lathe::v1::TensorData t;
  t.set_dtype(dtype);
  t.add_shape(static_cast<int64_t>(v.size()));
  t.set_data(v.data(), v.size() * sizeof(T));
  return t;
}

inline lathe::v1::Datum MakeDatum(const std::vector<int32_t>& tokens, const std::vector<int64_t>& targets,
                                  const std::vector<float>& weights) {
  lathe::v1::Datum d;
  d.mutable_model_input()->add_chunks()->mutable_encoded_text()->set_tokens(tokens.data(), tokens.size() * 4);
  (*d.mutable_loss_fn_inputs())["target_tokens"] = Wire(targets, lathe::v1::INT64);
  (*d.mutable_loss_fn_inputs())["weights"] = Wire(weights, lathe::v1::FLOAT32);
  return d;
}

}  // namespace lathe::runtime

#endif  // LATHE_TESTS_RUNTIME_WIRE_DATUM_H_
