// A lathe.v1.SubmitRequest in protobuf wire form, as the gRPC door receives
// it, through the checks FrontEnd::Admit applies. An admitted op must hold
// what the runtime relies on: tokens inside the vocabulary, sequences within
// max_seq_len.
#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_util.h"
#include "core/validation.h"

namespace {

void CheckAdmittedBatch(const lathe::v1::ForwardBackwardInput& input) {
  for (const lathe::v1::Datum& datum : input.data()) {
    absl::StatusOr<std::vector<int32_t>> tokens = lathe::runtime::DatumTokens(datum);
    LATHE_FUZZ_CHECK(tokens.ok());
    LATHE_FUZZ_CHECK(!tokens->empty() && static_cast<int64_t>(tokens->size()) <= lathe::fuzz::Model().max_seq_len());
    for (int32_t t : *tokens) LATHE_FUZZ_CHECK(t >= 0 && t < lathe::fuzz::Model().vocab_size());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lathe::v1::SubmitRequest op;
  if (!op.ParseFromArray(data, static_cast<int>(size))) return 0;
  if (!lathe::fuzz::Admit(op).ok()) return 0;
  if (op.has_forward()) CheckAdmittedBatch(op.forward());
  if (op.has_forward_backward()) CheckAdmittedBatch(op.forward_backward());
  if (op.has_sample()) {
    absl::StatusOr<std::vector<int32_t>> prompt = lathe::runtime::InputTokens(op.sample().prompt());
    LATHE_FUZZ_CHECK(prompt.ok() && !prompt->empty());
  }
  return 0;
}
